"""scripts/gpu_check.sh on its CPU path (what CI can run), and the AMP dtype rule the GPU path uses."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ssl_nnunet.training.ssl_trainer import resolve_amp_dtype
from ssl_nnunet.utilities.errors import SSLInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["mae", "mim", "voco", "gvsl", "alice"]


def test_gpu_check_cpu_path_reports_every_method_and_exports(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "-device", "cpu", "-profile",
                           "cpu_smoke", "-iterations", "3", "-timed", "1", "-warmup", "1", "-o", str(out), "-root",
                           str(tmp_path / "root")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in report["throughput"]] == METHODS
    for row in report["throughput"]:
        assert row["ssl_step_s"] > 0 and row["plain_step_s"] > 0 and row["amp"] == "off"
        assert row["peak_memory_mb"] > 0
    assert report["mae_pretraining"]["iterations_done"] == 3 and report["export_ok"]
    assert report["amp"] == "off (CPU)" and report["bf16_supported"] is False
    table = (tmp_path / "report.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    # the bundle is real: its checkpoint holds the network's weights
    bundle = torch.load(tmp_path / "root" / "export_mae" / "checkpoint_final.pth", weights_only=False)
    assert bundle["network_weights"]


def test_amp_dtype_is_bf16_where_supported_else_fp16(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert resolve_amp_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp_dtype("auto", cuda) == torch.bfloat16
    assert resolve_amp_dtype("float16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "an old GPU")
    assert resolve_amp_dtype("auto", cuda) == torch.float16
    with pytest.raises(SSLInputError, match="amp_dtype.*bfloat16.*an old GPU"):
        resolve_amp_dtype("bfloat16", cuda)
    with pytest.raises(SSLInputError, match="amp_dtype.*'fp8'"):
        resolve_amp_dtype("fp8", cuda)
