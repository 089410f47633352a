"""Bounded loader state (case LRU, unreadable cases) and loader worker processes (issue 16 items 1, 2)."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ssl_nnunet.benchmark.data_scale import process_handles, write_tiny_dataset
from ssl_nnunet.data.loader import PrefetchLoader, worker_seed
from ssl_nnunet.data.samplers import UnlabeledPatchSampler
from ssl_nnunet.utilities.errors import SSLInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    return folder, write_tiny_dataset(folder, 1100)


def _sampler(folder, ids, **kw):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    return UnlabeledPatchSampler(nnUNetDatasetBlosc2(folder, ids), ids, (8, 8, 8), 4, seed=0, **kw)


def test_open_files_and_mappings_stay_flat(tiny_cases):
    folder, ids = tiny_cases
    sampler = _sampler(folder, ids, max_open_cases=4)
    for _ in range(10):
        sampler.next_batch()
    start = process_handles()
    for _ in range(100):
        sampler.next_batch()
    assert sampler.cases.num_seen > 300 and sampler.cases.num_open <= 4
    end = process_handles()
    assert end["open_files"] <= start["open_files"] and end["mappings"] <= start["mappings"]


def test_more_distinct_cases_than_ulimit_n_1024(tiny_cases):
    folder, ids = tiny_cases
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        from ssl_nnunet.data.samplers import UnlabeledPatchSampler
        ids = {ids!r}
        ds = nnUNetDatasetBlosc2({folder!r}, ids)
        s = UnlabeledPatchSampler(ds, ids, (8, 8, 8), 1)
        for i in ids:
            s.sample_patch(i)
        assert s.cases.num_seen == len(ids) > 1024
        kept = []  # the unbounded cache this replaces runs out of files
        try:
            for i in ids:
                kept.append(ds.load_case(i)[0])
        except OSError as e:
            print("unbounded:", e.errno)
        print("bounded ok")
    """)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bounded ok" in out.stdout and "unbounded: 24" in out.stdout


def test_unreadable_case_skipped_and_named(tmp_path, caplog):
    folder = str(tmp_path)
    ids = write_tiny_dataset(folder, 20)
    with open(os.path.join(folder, ids[3] + ".b2nd"), "wb") as f:
        f.write(b"not a blosc2 file")
    sampler = _sampler(folder, ids, max_bad_case_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="ssl_nnunet.data"):
        for _ in range(20):
            assert sampler.next_batch().shape == (4, 1, 8, 8, 8)
    assert list(sampler.cases.bad) == [ids[3]]
    assert os.path.join(folder, ids[3] + ".b2nd") in caplog.text
    for i in (5, 7):  # 3 of 20 bad > 10 %: the run stops, naming the cases
        os.remove(os.path.join(folder, ids[i] + ".b2nd"))
    with pytest.raises(SSLInputError) as e:
        for _ in range(200):
            sampler.next_batch()
    assert all(ids[i] in str(e.value) for i in (3, 5, 7))


class _Factory:
    def __init__(self, folder, ids):
        self.folder, self.ids = folder, ids

    def __call__(self, seed):
        return _seeded(self.folder, self.ids, seed)


def _seeded(folder, ids, seed):
    s = _sampler(folder, ids)
    s.rng = np.random.RandomState(seed)
    return s


def test_workers_reproducible_and_gone_after_error(tmp_path):
    folder = str(tmp_path)
    ids = write_tiny_dataset(folder, 12)
    factory = _Factory(folder, ids)
    runs = []
    for _ in range(2):
        with PrefetchLoader(None, 2, num_workers=2, sampler_factory=factory, seed=7, rank=1) as loader:
            runs.append([next(loader) for _ in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # batch i comes from worker i mod 2, seeded worker_seed(seed, rank, worker)
    expected = _seeded(folder, ids, worker_seed(7, 1, 1))
    assert torch.equal(runs[0][1], expected.next_batch()) and torch.equal(runs[0][3], expected.next_batch())
    assert not torch.equal(runs[0][0], runs[0][1])
    for i in ids:  # every case unreadable: the workers' SSLInputError reaches the parent
        os.remove(os.path.join(folder, i + ".b2nd"))
    loader = PrefetchLoader(None, 2, num_workers=2, sampler_factory=factory, seed=7)
    pids = loader.worker_pids
    with pytest.raises(SSLInputError, match="unreadable"):
        next(loader)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


def test_default_num_loader_workers(monkeypatch):
    from ssl_nnunet.training.run import default_num_loader_workers
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    assert default_num_loader_workers("cpu") == 0
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    assert default_num_loader_workers("cpu") == 1 and default_num_loader_workers("cuda") == 1


_PARENT_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    # Ctrl-C raises KeyboardInterrupt even where the test runner was started in the background, whose children
    # inherit SIGINT as ignored (then Python installs no handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from ssl_nnunet.benchmark.data_scale import _PatchSamplerFactory, write_tiny_dataset
    from ssl_nnunet.data.loader import PrefetchLoader
    folder, mode = sys.argv[1], sys.argv[2]
    ids = write_tiny_dataset(folder, 6)
    loader = PrefetchLoader(None, 2, num_workers=2, sampler_factory=_PatchSamplerFactory(folder, ids, (8, 8, 8), 2))
    next(loader)
    print("PIDS", *loader.worker_pids, flush=True)
    if mode == "raise":  # an exception in the training process that nobody catches (no close() called)
        raise RuntimeError("failure in the training step")
    while True:  # 'interrupt' / 'kill': the parent keeps consuming until the test signals it
        next(loader)
        time.sleep(0.01)
""")


def _gone(pid: int) -> bool:
    """No process ``pid`` (or only a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("mode", ["raise", "interrupt", "kill"])
def test_no_orphaned_workers_after_parent_error_interrupt_or_kill(tmp_path, mode):
    import signal
    import time
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PARENT_SCRIPT, str(tmp_path), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), (line, proc.stderr.read() if proc.poll() is not None else "")
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        if mode == "interrupt":
            proc.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the parent; workers ignore SIGINT
        elif mode == "kill":
            proc.kill()  # SIGKILL: no cleanup in the parent at all; the workers notice it is gone
        proc.wait(timeout=60)
        err = proc.stderr.read()
        if mode == "raise":
            assert proc.returncode == 1 and "failure in the training step" in err
        elif mode == "interrupt":
            assert "KeyboardInterrupt" in err
        deadline = time.time() + 15
        while time.time() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), f"orphaned loader workers {pids} after '{mode}'"
    finally:
        if proc.poll() is None:
            proc.kill()
