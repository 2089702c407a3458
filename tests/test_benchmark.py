"""``nnunetv2-ext benchmark`` on tiny plans: fields present and numerically sane."""
import json
import os
import subprocess
import sys

import pytest
import torch

from plans_factory import make_configuration, make_plans
from nnunetv2_ext.benchmark import (BenchmarkError, format_markdown, peak_tensor_bytes, run_benchmark,
                                    scaled_patch_sizes, top_ops)
from nnunetv2_ext.cli import default_benchmark_trainers

DATASET = 'Dataset977_BenchTiny'


@pytest.fixture(scope='module')
def tiny_plans():
    cm = make_configuration([16, 16, 16], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [4, 8, 8])
    plans = make_plans(cm)
    plans.pop('continue_training')
    plans['dataset_name'] = DATASET
    folder = os.path.join(os.environ['nnUNet_preprocessed'], DATASET)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'nnUNetPlans.json'), 'w') as f:
        json.dump(plans, f)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'CT', '1': 'MR'}, 'labels': {'background': 0, 'a': 1, 'b': 2},
                   'numTraining': 5, 'file_ending': '.nii.gz'}, f)
    return cm


def test_report_fields_and_sanity(tiny_plans):
    report = run_benchmark(DATASET, '3d_fullres', 'nnUNetPlans', ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'],
                           device='cpu', scaling=[0.5, 1.0], warmup=1, repeats=2, progress=False)
    assert report['schema'] == 2 and report['batch_size'] == 2 and report['device'].startswith('CPU')
    rows = {(r['trainer'], tuple(r['patch_size'])): r for r in report['results']}
    assert set(rows) == {(t, p) for t in ('nnUNetTrainer', 'nnUNetTrainerLightDecoder') for p in ((8, 8, 8),
                                                                                                  (16, 16, 16))}
    from nnunetv2_ext.benchmark import find_trainer, load_plans
    pm, cm, _ = load_plans(DATASET, 'nnUNetPlans', '3d_fullres')
    for t in ('nnUNetTrainer', 'nnUNetTrainerLightDecoder'):
        net = find_trainer(t).build_network_architecture(pm, cm, 2, 3, True)
        small, big = rows[(t, (8, 8, 8))], rows[(t, (16, 16, 16))]
        assert small['params'] == big['params'] == sum(p.numel() for p in net.parameters())
        assert 0 < small['forward_flops'] < big['forward_flops']
        # convolutions: FLOPs scale with voxels (x8), up to boundary-free terms
        assert 6 < big['forward_flops'] / small['forward_flops'] <= 8.5
        for r in (small, big):
            assert r['step_ms'] > 0 and len(r['step_ms_all']) == 2 and r['inference_ms'] > 0
            # the peak holds at least everything stored for backward (parameters were allocated before)
            assert 'profiler' in r['memory_method']
            assert r['peak_memory_bytes'] >= r['saved_activation_bytes'] - 4 * r['params']
        # saved activations: at least the fp32 input of the first conv at batch 2, growing with the patch
        assert small['saved_activation_bytes'] >= 2 * 2 * 8 ** 3 * 4
        assert 4 < big['saved_activation_bytes'] / small['saved_activation_bytes'] <= 8.5
    table = format_markdown(report)
    assert table.count('| nnUNetTrainerLightDecoder |') == 2
    base = rows[('nnUNetTrainer', (16, 16, 16))]
    ours = rows[('nnUNetTrainerLightDecoder', (16, 16, 16))]
    section = table[table.index('Patch 16×16×16'):]
    cells = next(line for line in section.splitlines() if line.startswith('| nnUNetTrainerLightDecoder |')).split('|')
    # ratio columns: step, peak memory, saved activations relative to the first trainer
    assert float(cells[5]) == pytest.approx(ours['step_ms'] / base['step_ms'], abs=0.006)
    assert float(cells[9]) == pytest.approx(ours['saved_activation_bytes'] / base['saved_activation_bytes'], abs=0.006)


def test_flops_match_a_hand_count():
    """One 3x3x3 conv layer: 2 * k^3 * Cin * Cout * voxels FLOPs (what FlopCounterMode reports)."""
    from torch.utils.flop_counter import FlopCounterMode
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    with FlopCounterMode(display=False) as c:
        conv(torch.randn(1, 2, 8, 8, 8))
    assert c.get_total_flops() == 2 * 27 * 2 * 4 * 8 ** 3


def test_scaled_patch_sizes_respect_strides():
    assert scaled_patch_sizes([20, 64, 48], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [0.5, 1.0, 2.0]) == \
        [[8, 32, 24], [20, 64, 48], [40, 128, 96]]


def test_clear_errors(tiny_plans):
    with pytest.raises(BenchmarkError, match="unknown trainer 'NoSuchTrainer'"):
        run_benchmark(DATASET, '3d_fullres', 'nnUNetPlans', ['NoSuchTrainer'], device='cpu', progress=False)
    with pytest.raises(BenchmarkError, match='run nnUNetv2_plan_and_preprocess'):
        run_benchmark(DATASET, '3d_fullres', 'OtherPlans', ['nnUNetTrainer'], device='cpu', progress=False)
    with pytest.raises(BenchmarkError, match="no configuration '2d'"):
        run_benchmark(DATASET, '2d', 'nnUNetPlans', ['nnUNetTrainer'], device='cpu', progress=False)


def test_default_trainers_are_baseline_plus_our_main_ones():
    names = default_benchmark_trainers()
    assert names[0] == 'nnUNetTrainer' and 'nnUNetTrainerLightDecoder' in names
    assert not any(n.endswith('_ExtDemo') or n == 'nnUNetTrainerExtBase' or '_' in n for n in names)


def test_top_ops_attributes_time_to_the_operations_that_ran():
    a, b = torch.randn(384, 384), torch.randn(8)
    rows = top_ops(lambda: (a @ a @ a, b + 1), torch.device('cpu'), top=3)
    assert rows[0]['name'] == 'aten::mm' and rows[0]['share'] > 0.5  # two 384^3 products dwarf an 8-vector add
    assert rows[-1] == {'name': '(total)', 'ms': pytest.approx(rows[-1]['ms']), 'share': 1.0}
    assert len(rows) <= 4 and sum(r['ms'] for r in rows[:-1]) <= rows[-1]['ms'] * (1 + 1e-9)
    assert [r['ms'] for r in rows[:-1]] == sorted((r['ms'] for r in rows[:-1]), reverse=True)
    with pytest.raises(RuntimeError, match='no CPU time'):
        top_ops(lambda: None, torch.device('cpu'))


def test_top_ops_runs_calls_times_and_gives_the_time_per_call(monkeypatch):
    import nnunetv2_ext.benchmark as bm
    ran = []
    monkeypatch.setattr(bm, '_self_times', lambda events, cuda: {'aten::mm': 6.0, 'aten::add': 2.0})
    rows = top_ops(lambda: ran.append(1), torch.device('cpu'), calls=4)
    assert len(ran) == 4
    assert [(r['name'], r['ms']) for r in rows] == [('aten::mm', 1.5), ('aten::add', 0.5), ('(total)', 2.0)]


def test_device_times_leave_out_annotations_of_host_ranges():
    """A custom op's (or record_function's) span on the device encloses its kernels: counted with them, the
    device time doubled (the H200 run of 2026-12-04: cuda_wkv::backward_kernel beside its own kernels)."""
    from types import SimpleNamespace
    from torch.autograd import DeviceType

    from nnunetv2_ext.benchmark import _self_times

    def evt(key, dev, us, annotation=False):
        return SimpleNamespace(key=key, device_type=dev, self_device_time_total=us, self_cpu_time_total=us,
                               is_user_annotation=annotation)
    events = [evt('cuda_wkv::forward_kernel', DeviceType.CPU, 40.0),
              evt('cuda_wkv::forward_kernel', DeviceType.CUDA, 300.0),  # named like the host op
              evt('## step ##', DeviceType.CUDA, 500.0, annotation=True),  # flagged by the profiler
              evt('void fwd_rescan_kernel<float>', DeviceType.CUDA, 200.0),
              evt('void fwd_summary_kernel<float>', DeviceType.CUDA, 100.0),
              evt('triton_poi_fused_add_0', DeviceType.CPU, 5.0),  # Inductor's launcher names its range so
              evt('triton_poi_fused_add_0', DeviceType.CUDA, 30.0)]  # ... and the kernel is one to count
    assert _self_times(events, cuda=True) == {'void fwd_rescan_kernel<float>': 0.2,
                                              'void fwd_summary_kernel<float>': 0.1, 'triton_poi_fused_add_0': 0.03}
    assert _self_times(events[:1], cuda=False) == {'cuda_wkv::forward_kernel': 0.04}  # CPU: operators


def test_cli_writes_outputs(tiny_plans, tmp_path):
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'benchmark', '-d', DATASET, '-tr',
                          'nnUNetTrainerLightDecoder', '--device', 'cpu', '--warmup', '0', '--repeats', '1', '-o',
                          str(tmp_path), '--profile'], capture_output=True, text=True, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / 'benchmark.json').read_text())
    assert [r['trainer'] for r in report['results']] == ['nnUNetTrainerLightDecoder']
    ops = report['results'][0]['top_ops']  # --profile: where one training step's CPU time went
    assert ops[-1]['name'] == '(total)' and any('convolution' in o['name'] for o in ops[:-1])
    assert 'Time by operation, one profiled step of nnUNetTrainerLightDecoder' in (tmp_path / 'benchmark.md').read_text()
    assert (tmp_path / 'benchmark.png').stat().st_size > 0 and (tmp_path / 'benchmark.md').exists()
    bad = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'benchmark', '-d', DATASET, '-tr', 'Nope',
                          '--device', 'cpu'], capture_output=True, text=True, env=os.environ.copy())
    assert bad.returncode == 1 and "unknown trainer 'Nope'" in bad.stderr


def test_compile_runs_the_measured_network_compiled_and_each_row_says_so(tiny_plans, monkeypatch):
    """``torch_compile=True``: the network goes through ``torch.compile(network)`` (nnU-Net's call, no options)
    and the measured steps run its compiled forward and backward graphs. The backend is swapped for AOT
    autograd around eager code that counts the graphs (inductor takes minutes on a CPU)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.eval_frame import OptimizedModule

    graphs = {'forward': 0, 'backward': 0}

    def counting(kind):
        def compiler(gm, example_inputs):
            graphs[kind] += 1
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=counting('forward'), bw_compiler=counting('backward'))
    real_compile, networks = torch.compile, []

    def nnunet_call(model, **options):
        assert not options  # nnUNetTrainer.initialize: torch.compile(self.network)
        networks.append(real_compile(model, backend=backend))
        return networks[-1]

    monkeypatch.setattr(torch, 'compile', nnunet_call)
    report = run_benchmark(DATASET, '3d_fullres', 'nnUNetPlans', ['nnUNetTrainerLightDecoder'], device='cpu',
                           warmup=0, repeats=1, progress=False, torch_compile=True)
    row, = report['results']
    assert 'error' not in row, row
    assert row['compiled'] is True and row['compile_s'] > 0 and row['step_ms'] > 0 and row['inference_ms'] > 0
    assert len(networks) == 1 and isinstance(networks[0], OptimizedModule)
    assert graphs['forward'] >= 2 and graphs['backward'] >= 1  # training (fwd + bwd) and inference graphs
    assert row['saved_activation_bytes'] > 0 and row['peak_memory_bytes'] > 0
    assert '| yes (compiling step ' in format_markdown(report)
    graphs.update(forward=0, backward=0)
    default = run_benchmark(DATASET, '3d_fullres', 'nnUNetPlans', ['nnUNetTrainerLightDecoder'], device='cpu',
                            warmup=0, repeats=1, progress=False)  # nnU-Net never compiles on the CPU
    assert default['results'][0]['compiled'] is False and default['results'][0]['compile_s'] is None
    assert len(networks) == 1 and graphs == {'forward': 0, 'backward': 0}
    assert format_markdown(default).rstrip().splitlines()[-3].endswith('| no |')


def test_compiles_by_default_where_the_trainer_would(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_ext.benchmark import trainer_compiles
    from nnunetv2_ext.trainers import nnUNetTrainerGLSP_EncRefine, nnUNetTrainerLightDecoder

    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    monkeypatch.delenv('nnUNet_compile', raising=False)
    assert trainer_compiles(nnUNetTrainer, cuda) and trainer_compiles(nnUNetTrainerLightDecoder, cuda)
    assert not trainer_compiles(nnUNetTrainerLightDecoder, cpu)
    assert not trainer_compiles(nnUNetTrainerGLSP_EncRefine, cuda)  # this trainer switches compilation off
    monkeypatch.setenv('nnUNet_compile', 'f')
    assert not trainer_compiles(nnUNetTrainerLightDecoder, cuda)
    monkeypatch.setenv('nnUNet_compile', 'true')
    assert trainer_compiles(nnUNetTrainerLightDecoder, cuda) and not trainer_compiles(nnUNetTrainer, cpu)


@pytest.mark.parametrize('flag,expected', [([], None), (['--compile'], True), (['--no-compile'], False)])
def test_cli_compile_option(tiny_plans, tmp_path, monkeypatch, flag, expected):
    import nnunetv2_ext.benchmark
    from nnunetv2_ext.cli import main

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise BenchmarkError('recorded')

    monkeypatch.setattr(nnunetv2_ext.benchmark, 'run_benchmark', record)
    assert main(['benchmark', '-d', DATASET, '-tr', 'nnUNetTrainer', '-o', str(tmp_path / 'o'), *flag]) == 1
    assert seen['torch_compile'] is expected


def test_bench_networks_script_measures_synthetic_and_resenc_plans(tmp_path):
    """benchmarks/bench_networks.py re-plans synthetic plans per patch and measures with the same code."""
    out = tmp_path / 'nets'
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks',
                                                        'bench_networks.py'),
                           'nnUNetTrainer', 'nnUNetTrainer@resenc_m', '--patch-sizes', '16x16x16', '--base-features',
                           '2', '--max-features', '4', '--repeats', '1', '--warmup', '0', '--device', 'cpu',
                           '--out', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / 'nets.json').read_text())
    plain, resenc = report['results']
    assert (plain['trainer'], resenc['trainer']) == ('nnUNetTrainer', 'nnUNetTrainer@resenc_m')
    assert resenc['params'] > plain['params'] and resenc['forward_flops'] > plain['forward_flops']
    # nnU-Net's topology rule for 16^3 at 2.0x0.8x0.8 mm: the planned strides are recorded
    assert report['plans'][0]['patch_size'] == [16, 16, 16] and report['plans'][0]['features'][0] == 2
    assert (tmp_path / 'nets.md').read_text().count('| nnUNetTrainer') == 2 and (tmp_path / 'nets.png').exists()


def test_fake_counts_match_real_saved_bytes_and_amp_halves_convolutions(tmp_path):
    """--fake counts on fake tensors what saved_activation_bytes measures on real ones; under emulated CUDA AMP
    nnU-Net's network stores float16 (about half)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_ext.benchmark import _stand_in_loss, _targets, fake_step_cost, find_trainer, saved_activation_bytes

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
    try:
        import bench_networks
    finally:
        sys.path.pop(0)
    configuration = bench_networks.with_patch(bench_networks.synthetic_configuration([1, 1, 1], 4, 16), [32, 32, 32])
    pm = PlansManager(bench_networks.plans_dict(configuration))
    cm = pm.get_configuration('3d_fullres')
    # PVT-GDLA: its initialisers (trunc_normal_) cannot run on fake tensors; the network is built on 'meta'
    for name in ('nnUNetTrainer', 'nnUNetTrainerGLSP', 'nnUNetTrainerPVTGDLA_PlansWidths'):
        trainer = find_trainer(name)
        fake = fake_step_cost(trainer, pm, cm, 1, 3, [32, 32, 32], 2)
        amp = fake_step_cost(trainer, pm, cm, 1, 3, [32, 32, 32], 2, amp=True)
        torch.manual_seed(0)
        net = trainer.build_network_architecture(pm, cm, 1, 3, True)
        x = torch.randn(2, 1, 32, 32, 32)
        targets = _targets(net(x), 3, 'cpu')
        assert fake['stored_activation_bytes'] == saved_activation_bytes(lambda: _stand_in_loss(net(x), targets))
        assert fake['params'] == sum(p.numel() for p in net.parameters()) and fake['step_flops'] > 0
        if name == 'nnUNetTrainer':
            assert 0.45 < amp['stored_activation_bytes'] / fake['stored_activation_bytes'] < 0.6


def test_peak_tensor_bytes_follows_the_allocator():
    resident = torch.empty(4_000_000)  # allocated before: not counted

    def run():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # + 8 MB = the peak
        del a
        c = torch.empty(500_000)  # 8 + 2 MB
        return b.numel() + c.numel() + resident.numel()

    assert peak_tensor_bytes(run) == 12_000_000


OOM_TRAINER = """
import json, os
import torch
from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder


class nnUNetTrainer_BenchOOM(nnUNetTrainerLightDecoder):
    @staticmethod
    def build_network_architecture(*args, **kwargs):
        published = os.path.join(os.environ['BENCH_OUT'], 'benchmark.json')
        rows = len(json.load(open(published))['results']) if os.path.exists(published) else 0
        raise torch.OutOfMemoryError(f'CUDA out of memory. Tried to allocate 20.00 GiB (rows published before: {rows})'
                                     '\\nsecond line of the message')
"""


def test_a_failing_trainer_is_a_row_and_the_others_are_kept(tiny_plans, tmp_path):
    """One trainer running out of memory must not throw away the other measurements; each result is published
    as soon as it is measured (the failing trainer sees the first row already on disk)."""
    folder = tmp_path / 'user_trainers'
    folder.mkdir()
    (folder / 'bench_oom_trainers.py').write_text(OOM_TRAINER)
    out = tmp_path / 'out'
    env = {**os.environ, 'nnUNet_extTrainer': str(folder), 'BENCH_OUT': str(out)}
    cmd = [sys.executable, '-m', 'nnunetv2_ext.cli', 'benchmark', '-d', DATASET, '--device', 'cpu', '--warmup', '0',
           '--repeats', '1', '-o', str(out), '-tr']
    run = subprocess.run(cmd + ['nnUNetTrainer', 'nnUNetTrainer_BenchOOM', 'nnUNetTrainerLightDecoder'],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '1 of 3 runs failed' in run.stderr
    rows = json.loads((out / 'benchmark.json').read_text())['results']
    assert [r['trainer'] for r in rows] == ['nnUNetTrainer', 'nnUNetTrainer_BenchOOM', 'nnUNetTrainerLightDecoder']
    assert rows[1]['error'] == ('OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB '
                                '(rows published before: 1)')
    assert rows[0]['step_ms'] > 0 and rows[2]['step_ms'] > 0 and 'error' not in rows[2]
    table = (out / 'benchmark.md').read_text()
    assert '| nnUNetTrainer_BenchOOM | failed: OutOfMemoryError: CUDA out of memory.' in table
    assert table.count('| nnUNetTrainerLightDecoder | ') == 1 and (out / 'benchmark.png').stat().st_size > 0
    everything_failed = subprocess.run(cmd + ['nnUNetTrainer_BenchOOM'], capture_output=True, text=True, env=env)
    assert everything_failed.returncode == 1 and '1 of 1 runs failed' in everything_failed.stderr


def test_cudnn_is_autotuned_as_nnunetv2_train_sets_it_and_restored(tiny_plans, monkeypatch):
    """``nnUNetv2_train`` sets ``cudnn.benchmark = True, deterministic = False``; every measured step must run so
    (a benchmark without autotuning times other convolution algorithms than training uses), and the caller's flags
    come back afterwards, also when the measurement fails."""
    from nnunetv2_ext import benchmark

    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
        raise RuntimeError('stop here')

    monkeypatch.setattr(benchmark, '_measure', spy)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    report = run_benchmark(DATASET, '3d_fullres', 'nnUNetPlans', ['nnUNetTrainer'], device='cpu', warmup=0,
                           repeats=1, progress=False)
    assert seen == [(True, False)]
    assert 'stop here' in report['results'][0]['error']
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
