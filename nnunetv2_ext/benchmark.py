"""``nnunetv2-ext benchmark``: cost of trainers' networks on a dataset's plans.

Per trainer and patch size: parameters, forward FLOPs per patch (``torch.utils.flop_counter``, batch 1),
training-step time (zero_grad → forward → loss → backward → SGD step, the plans' batch size,
median of repeats after warm-up; autocast on CUDA as nnU-Net does), peak memory of that step, the bytes
autograd saves for backward in one forward + loss (unique storages, via ``saved_tensors_hooks``: the
device-independent activation footprint), and inference time per patch (batch 1, deep supervision off,
no TTA). The markdown table gives step time and memory also as ratios to the first trainer.

``torch.compile``: each network is compiled as ``nnUNetTrainer.initialize`` compiles it
(``torch.compile(network)``) when ``torch_compile`` is true; by default (``None``) exactly when the trainer
would compile it on that device (its ``_do_i_compile``: nnU-Net compiles on CUDA unless ``nnUNet_compile`` is
false, never on CPU or MPS).
Parameters and FLOPs are counted on the eager network; the first (compiling) training step runs before the
warm-up and its duration is reported as ``compile_s``; the first inference call (which compiles again, in
eval mode without gradients) is not timed either. Each row records ``compiled``.

A run that fails (out of memory at a large patch, a network that cannot serve the plans, e.g. a 3-D-only
network on ``2d``) becomes a row with its ``error`` and the other runs go on; ``on_result`` sees the report
after every row, so the CLI publishes results as they complete.

With ``profile`` one more training step runs under the PyTorch profiler and the row gets ``top_ops``: where that
step's time goes, by operation (:func:`top_ops`).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps, above what was allocated before
them; on CPU the same quantity for one extra training step, from the allocator's events in the PyTorch
profiler's memory timeline (:func:`peak_tensor_bytes`).

The loss is a stand-in with nnU-Net's cost profile: cross-entropy against random labels on every
deep-supervision output (equal weights). Networks are built with the trainer's own
``build_network_architecture``, so stock nnU-Net trainers, ours and users' subclasses all work.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class Measurement:
    trainer: str
    patch_size: list[int]
    batch_size: int
    params: int
    forward_flops: int
    step_ms: float
    step_ms_all: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    memory_method: str = ''
    inference_ms: float = math.nan
    saved_activation_bytes: int = 0
    compiled: bool = False
    compile_s: float | None = None
    top_ops: list[dict] | None = None  # with ``profile``: see :func:`top_ops`


class BenchmarkError(RuntimeError):
    """Bad input (unknown trainer, missing plans); the message says what to do."""


def load_plans(dataset: str, plans: str, configuration: str):
    """``(PlansManager, ConfigurationManager, dataset_json)`` from ``$nnUNet_preprocessed``."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not nnUNet_preprocessed.is_set():
        raise BenchmarkError('nnUNet_preprocessed is not set: export nnUNet_preprocessed=/path/to/nnUNet_preprocessed')
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise BenchmarkError(str(e)) from None
    folder = os.path.join(nnUNet_preprocessed.get(), name)
    plans_file = os.path.join(folder, f'{plans}.json')
    if not os.path.isfile(plans_file):
        raise BenchmarkError(f'no plans file {plans_file}: run nnUNetv2_plan_and_preprocess -d {dataset} '
                             f'(add -pl/-overwrite_plans_name for other plans) first')
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise BenchmarkError(f"plans {plans} have no configuration '{configuration}' "
                             f"(available: {pm.available_configurations})")
    with open(os.path.join(folder, 'dataset.json')) as f:
        dataset_json = json.load(f)
    return pm, pm.get_configuration(configuration), dataset_json


def find_trainer(name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise BenchmarkError(f"unknown trainer '{name}': not in nnU-Net nor in the folders of nnUNet_extTrainer "
                             f"({os.environ.get('nnUNet_extTrainer', '')})") from None


def scaled_patch_sizes(patch_size, strides, factors) -> list[list[int]]:
    """``patch_size`` scaled by each factor, rounded to a positive multiple of the total stride per axis."""
    total = np.prod(np.asarray(strides, dtype=int), axis=0)
    out = []
    for f in factors:
        p = [int(max(t, round(s * f / t) * t)) for s, t in zip(patch_size, total)]
        if p not in out:
            out.append(p)
    return out


def trainer_compiles(trainer_cls, device: torch.device) -> bool:
    """Whether ``nnUNetTrainer.initialize`` of ``trainer_cls`` would ``torch.compile`` its network on ``device``:
    the trainer's own ``_do_i_compile`` (so subclasses that switch compilation off are honoured), asked of an
    instance that is not initialised (nothing but ``device`` is set)."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.device = device
    trainer.print_to_log_file = lambda *args, **kwargs: None
    return bool(trainer._do_i_compile())


def _stand_in_loss(outputs, targets) -> torch.Tensor:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(torch.nn.functional.cross_entropy(o.float(), t) for o, t in zip(outputs, targets))


def _targets(net_out, num_classes: int, device) -> list[torch.Tensor]:
    outs = net_out if isinstance(net_out, (list, tuple)) else [net_out]
    return [torch.randint(0, num_classes, (o.shape[0], *o.shape[2:]), device=device) for o in outs]


def saved_activation_bytes(run) -> int:
    """Bytes of the unique storages autograd saves for backward while ``run()`` executes."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # the StorageImpl: unique, also for fake tensors
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


def peak_tensor_bytes(run) -> int:
    """Peak bytes of tensors allocated while ``run()`` executes, above those alive before it — on CPU what
    ``torch.cuda.max_memory_allocated`` measures on a GPU (allocations and frees from the profiler's memory
    timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def fake_step_cost(trainer_cls, pm, cm, num_input_channels: int, num_heads: int, patch_size, batch_size: int,
                   amp: bool = False) -> dict:
    """Stored activations and FLOPs of one training step, counted on fake tensors: nothing is computed or
    allocated, so any patch size can be evaluated on any machine in seconds.

    Returns ``params``, ``stored_activation_bytes`` (:func:`saved_activation_bytes` of forward + loss) and, without
    ``amp``, ``step_flops`` (forward + backward incl. recomputation, ``FlopCounterMode``). ``amp``: CUDA
    autocast (float16) on fake CUDA tensors, i.e. the dtypes a GPU run with nnU-Net's AMP stores (forward
    only: autograd's engine needs a real GPU for CUDA tensors); the WKV call is counted as the CUDA
    kernel's custom op (its fake implementation gives the shapes).
    """
    from contextlib import ExitStack
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import cuda_wkv.dispatch

    device = torch.device('cuda' if amp else 'cpu')
    # built on the meta device (initialisers such as trunc_normal_ cannot run on fake tensors), then given
    # fake storage on the target device: shapes and dtypes are all that is counted
    with torch.device('meta'):
        net = trainer_cls.build_network_architecture(pm, cm, num_input_channels, num_heads, True)
    with ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        for module in net.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                                  p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty_like(b, device=device)
        if amp:
            stack.enter_context(mock.patch.object(cuda_wkv.dispatch, '_select_for_call', lambda *_: 'cuda'))
            was_enabled, was_dtype = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
            stack.callback(torch.set_autocast_dtype, 'cuda', was_dtype)
            stack.callback(torch.set_autocast_enabled, 'cuda', was_enabled)
        x = torch.randn(batch_size, num_input_channels, *patch_size, device=device)

        def forward_loss() -> torch.Tensor:
            if amp:  # set directly: autocast('cuda') refuses to start without a GPU
                torch.set_autocast_enabled('cuda', True)
                torch.set_autocast_dtype('cuda', torch.float16)
            out = net(x)
            if amp:
                torch.set_autocast_enabled('cuda', False)  # end the emulation; the stand-in loss is float32
            return _stand_in_loss(out, _targets(out, num_heads, device))

        cost = {'params': sum(p.numel() for p in net.parameters()),
                'stored_activation_bytes': saved_activation_bytes(forward_loss)}
        if not amp:
            with FlopCounterMode(display=False) as counter:
                forward_loss().backward()
            cost['step_flops'] = int(counter.get_total_flops())
    return cost


def top_ops(run: Callable[[], object], device: torch.device, top: int = 8, calls: int = 1) -> list[dict]:
    """Where one call of ``run()`` spends its time, from the PyTorch profiler over ``calls`` calls (times per
    call: their mean): on CUDA the device-side events (kernels, copies, memsets; self time), on CPU the
    operators' self CPU time. Returns up to ``top`` rows ``{name, ms, share}`` (largest first, ``share`` of the
    summed time) and a last row ``'(total)'`` with the summed time in ms and ``share`` 1. Names are cut to 100
    characters. Raises RuntimeError if the profiler saw no time at all (e.g. no CUDA activity recorded on a
    CUDA device)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        _sync(device)
    times = {name: ms / calls for name, ms in _self_times(prof.key_averages(), cuda).items()}
    total = sum(times.values())
    if total <= 0:
        raise RuntimeError(f'the profiler recorded no {"CUDA kernel" if cuda else "CPU"} time on {device}')
    rows = [{'name': n, 'ms': ms, 'share': ms / total}
            for n, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]]
    return rows + [{'name': '(total)', 'ms': total, 'share': 1.0}]


def _self_times(events, cuda: bool) -> dict[str, float]:
    """Self time in ms per event name (cut to 100 characters) of the profiler's averaged ``events``: on CUDA the
    device-side ones only. A device-side *annotation* is left out: the span of a host range on the device
    (a ``record_function`` such as ``cuda_wkv::backward_kernel``), whose "self" time is that of the kernels it
    encloses, which are counted themselves (counting both doubled the device time). The profiler marks them
    ``is_user_annotation``; where it does not, a device event named like a host range of the same profile
    with a ``::`` in its name is taken for one (kernels' names are not host ranges' -- except Triton's, which
    Inductor's launcher records under the kernel's own name, ``triton_...``, with no ``::``)."""
    from torch.autograd import DeviceType

    host_ranges = {evt.key for evt in events if evt.device_type == DeviceType.CPU and '::' in evt.key}
    times: dict[str, float] = {}
    for evt in events:
        if cuda:
            if (evt.device_type != DeviceType.CUDA or getattr(evt, 'is_user_annotation', False)
                    or evt.key in host_ranges):
                continue
            us = getattr(evt, 'self_device_time_total', None)
            us = evt.self_cuda_time_total if us is None else us
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            times[evt.key[:100]] = times.get(evt.key[:100], 0.0) + us / 1e3
    return times


def top_ops_unit(cuda: bool) -> str:
    """What the times of :func:`top_ops` are, for a table's heading."""
    return 'CUDA kernels, copies and memsets (device self time)' if cuda else 'operators (self CPU time)'


def top_ops_table(ops: list[dict]) -> list[str]:
    """The rows of :func:`top_ops` as markdown table lines (header included)."""
    return ['| operation | ms | share |', '|---|---:|---:|'] + [
        f"| {o['name'].replace('|', '/')} | {o['ms']:.3f} | {100 * o['share']:.1f} % |" for o in ops]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(trainer_cls, pm, cm, num_input_channels: int, num_heads: int, patch_size, batch_size: int,
            device: torch.device, warmup: int = 2, repeats: int = 5, torch_compile: bool = False,
            profile: bool = False) -> Measurement:
    """All figures for one trainer and patch size, in this process (see the module doc for methods);
    ``torch_compile``: run the network through ``torch.compile`` as nnU-Net does; ``profile``: also
    :func:`top_ops` of one more training step. cuDNN runs as
    ``nnUNetv2_train`` sets it (``benchmark=True``, ``deterministic=False``: algorithms autotuned during the
    warm-up); the previous flags are restored afterwards."""
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = True, False
    try:
        return _measure(trainer_cls, pm, cm, num_input_channels, num_heads, patch_size, batch_size, device, warmup,
                        repeats, torch_compile, profile)
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def _measure(trainer_cls, pm, cm, num_input_channels: int, num_heads: int, patch_size, batch_size: int,
             device: torch.device, warmup: int, repeats: int, torch_compile: bool, profile: bool) -> Measurement:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = trainer_cls.build_network_architecture(pm, cm, num_input_channels, num_heads, True).to(device)
    params = sum(p.numel() for p in net.parameters())
    x1 = torch.randn(1, num_input_channels, *patch_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x1)
    flops = counter.get_total_flops()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch_size, num_input_channels, *patch_size, device=device)
    with torch.no_grad():
        targets = _targets(net(x), num_heads, device)
    if torch_compile:
        net = torch.compile(net)  # the call of nnUNetTrainer.initialize

    def forward_loss() -> torch.Tensor:
        with torch.autocast(device.type, enabled=device.type == 'cuda'):
            return _stand_in_loss(net(x), targets)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_loss().backward()
        opt.step()

    compile_s = None
    if torch_compile:  # compiles forward and backward: not part of the timed steps
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base if device.type == 'cuda'
            else peak_tensor_bytes(step))
    saved = saved_activation_bytes(forward_loss)
    ops = top_ops(step, device) if profile else None
    net.decoder.deep_supervision = False
    net.eval()
    infer = []
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == 'cuda'):
        untimed = warmup + int(torch_compile)  # a compiled network compiles again for inference
        for i in range(untimed + repeats):
            _sync(device)
            t0 = time.perf_counter()
            net(x1)
            _sync(device)
            if i >= untimed:
                infer.append((time.perf_counter() - t0) * 1e3)
    return Measurement(trainer_cls.__name__, list(patch_size), batch_size, params, int(flops),
                       statistics.median(times), times, int(peak),
                       'cuda max_memory_allocated above the resident model/optimizer' if device.type == 'cuda'
                       else 'CPU: peak tensor allocation of one step above the resident model/optimizer '
                            '(profiler memory timeline)', statistics.median(infer), saved, torch_compile, compile_s, ops)


def run_benchmark(dataset: str, configuration: str, plans: str, trainers: list[str], device: str = 'auto',
                  batch_size: int | None = None, scaling: list[float] | None = None, warmup: int = 2,
                  repeats: int = 5, progress: bool = True, on_result=None, torch_compile: bool | None = None,
                  profile: bool = False) -> dict:
    """The report for a dataset's preprocessed plans (``nnunetv2-ext benchmark``); ``on_result(report)``
    after every row; ``torch_compile``: true/false, or ``None`` for what each trainer does on the device (see the
    module doc); ``profile``: each row also gets ``top_ops`` (:func:`top_ops` of one training step)."""
    pm, cm, dataset_json = load_plans(dataset, plans, configuration)
    classes = {t: find_trainer(t) for t in trainers}
    strides = cm.network_arch_init_kwargs['strides']
    patches = scaled_patch_sizes(cm.patch_size, strides, scaling or [1.0])
    jobs = [(t, classes[t], pm, cm, p) for p in patches for t in trainers]
    header = {'schema': 2, 'dataset': pm.dataset_name, 'plans': plans, 'configuration': configuration,
              'planned_patch_size': list(cm.patch_size)}
    report = benchmark_jobs(jobs, dataset_json, device, batch_size or cm.batch_size, warmup, repeats, progress,
                            on_result and (lambda partial: on_result({**header, **partial})), torch_compile,
                            profile)
    return {**header, **report}


def _failure(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters) for a failed run's row."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0] if lines else ""}'[:300]


def benchmark_jobs(jobs, dataset_json: dict, device: str = 'auto', batch_size: int = 2, warmup: int = 2,
                   repeats: int = 5, progress: bool = True, on_result=None, torch_compile: bool | None = None,
                   profile: bool = False) -> dict:
    """Measures ``(label, trainer class, PlansManager, ConfigurationManager, patch size)`` jobs; returns the
    device/version fields and ``results``: one :class:`Measurement` dict per job, or for a job that raised
    ``{trainer, patch_size, batch_size, compiled, error}``. ``on_result(report so far)`` after each job.
    ``torch_compile``, ``profile``: as in :func:`run_benchmark`."""
    from importlib.metadata import version

    from tqdm import tqdm

    dev = torch.device('cuda' if device == 'auto' and torch.cuda.is_available() else
                       ('cpu' if device == 'auto' else device))
    n_in = len(dataset_json.get('channel_names', dataset_json.get('modality', {'0': None})))
    report = {'batch_size': batch_size, 'device': _device_name(dev), 'torch': torch.__version__,
              'nnunetv2': version('nnunetv2'), 'threads': torch.get_num_threads(), 'warmup': warmup,
              'repeats': repeats, 'results': []}
    for label, trainer_cls, pm, cm, patch in tqdm(jobs, disable=not progress, desc='benchmark', unit='run'):
        compiled = None
        try:
            compiled = trainer_compiles(trainer_cls, dev) if torch_compile is None else torch_compile
            heads = pm.get_label_manager(dataset_json).num_segmentation_heads
            m = measure(trainer_cls, pm, cm, n_in, heads, patch, batch_size, dev, warmup, repeats, compiled, profile)
            m.trainer = label
            row = asdict(m)
        except Exception as e:  # recorded as the run's result; the other runs go on
            row = {'trainer': label, 'patch_size': list(patch), 'batch_size': batch_size, 'compiled': compiled,
                   'error': _failure(e)}
            tqdm.write(f"benchmark: {label} at patch {list(patch)} failed: {row['error']}")
            gc.collect()
            if dev.type == 'cuda':
                torch.cuda.empty_cache()
        report['results'].append(row)
        if on_result is not None:
            on_result(report)
    return report


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of it."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(dev: torch.device) -> str:
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    return f'CPU ({os.cpu_count()} cores)'


def format_markdown(report: dict) -> str:
    """One table per patch size; ``×`` columns are ratios to the first trainer measured at that patch size;
    failed runs are rows with their reason."""
    head = report.get('title') or f"{report['dataset']} / {report['plans']} / {report['configuration']}"
    lines = [f"{head} on {report['device']} (torch {report['torch']}, nnunetv2 {report['nnunetv2']}), batch "
             f"{report['batch_size']}, median of {report['repeats']} after {report['warmup']} warm-up."]
    for patch in dict.fromkeys(tuple(r['patch_size']) for r in report['results']):
        rows = [r for r in report['results'] if tuple(r['patch_size']) == patch]
        base = next((r for r in rows if 'error' not in r), None)
        lines += ['', f"Patch {'×'.join(map(str, patch))}:", '',
                  '| trainer | params (M) | GFLOPs fwd/patch | step ms | × | peak mem (MiB) | × | '
                  'saved activations (MiB) | × | infer ms/patch | compiled |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
        for r in rows:
            if 'error' in r:
                lines.append(f"| {r['trainer']} | failed: {r['error'].replace('|', '/')} |" + ' |' * 9)
                continue
            compiled = f"yes (compiling step {r['compile_s']:.0f} s)" if r['compiled'] else 'no'
            lines.append(
                f"| {r['trainer']} | {r['params'] / 1e6:.2f} | {r['forward_flops'] / 1e9:.2f} | {r['step_ms']:.0f} | "
                f"{r['step_ms'] / base['step_ms']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                f"{r['peak_memory_bytes'] / max(base['peak_memory_bytes'], 1):.2f} | "
                f"{r['saved_activation_bytes'] / 2**20:.0f} | "
                f"{r['saved_activation_bytes'] / max(base['saved_activation_bytes'], 1):.2f} | "
                f"{r['inference_ms']:.0f} | {compiled} |")
    measured = [r for r in report['results'] if 'error' not in r]
    if measured:
        lines += ['', f"Memory: {measured[0]['memory_method']}."]
    for r in (r for r in measured if r.get('top_ops')):
        lines += ['', f"Time by operation, one profiled step of {r['trainer']} at patch "
                      f"{'×'.join(map(str, r['patch_size']))}: {top_ops_unit(not report['device'].startswith('CPU'))}.",
                  '', *top_ops_table(r['top_ops'])]
    return '\n'.join(lines) + '\n'


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    keys = ('step_ms', 'peak_memory_bytes', 'saved_activation_bytes', 'forward_flops')
    measured = [r for r in report['results'] if 'error' not in r]
    for t in dict.fromkeys(r['trainer'] for r in measured):
        rows = sorted((r for r in measured if r['trainer'] == t), key=lambda r: math.prod(r['patch_size']))
        vox = [math.prod(r['patch_size']) for r in rows]
        for ax, key, scale in zip(axes, keys, (1, 2**-20, 2**-20, 1e-9)):
            ax.plot(vox, [r[key] * scale for r in rows], 'o-', label=t)
    for ax, title in zip(axes, ('training step (ms)', 'peak memory (MiB)', 'saved activations (MiB)',
                                'forward GFLOPs per patch')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('voxels per patch')
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report.get('title') or report['dataset'] + ' ' + report['configuration']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
