"""oneDNN convolutions for batch-1 CPU inference (nnU-Net's sliding window): same outputs, other kernel."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn
from torch.profiler import profile

from ssl_nnunet.utilities.cpu_inference import onednn_conv3d_inference

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _net():
    torch.manual_seed(0)
    return ResidualEncoderUNet(1, 4, [8, 16, 32, 64], nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], 3, [1, 1, 1],
                               conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


def _conv_kernels(fn):
    with profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return {k for k in ("aten::mkldnn_convolution", "aten::slow_conv3d_forward") if k in names}


def test_batch1_inference_uses_onednn_and_gives_the_same_logits():
    net, x = _net(), torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        plain = net(x)
        # the reason this exists: PyTorch's own choice for this input is the generic kernel
        assert "aten::slow_conv3d_forward" in _conv_kernels(lambda: net(x))
        with onednn_conv3d_inference(net):
            fast = net(x)
            assert _conv_kernels(lambda: net(x)) == {"aten::mkldnn_convolution"}
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    # restored on exit: no instance attribute left behind, PyTorch's dispatch again
    assert not any("_conv_forward" in m.__dict__ for m in net.modules())
    with torch.no_grad():
        assert "aten::slow_conv3d_forward" in _conv_kernels(lambda: net(x))


def test_training_and_disabled_keep_pytorchs_convolution():
    net, x = _net(), torch.randn(1, 1, 32, 32, 32)
    net(x).sum().backward()
    ref = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad(set_to_none=True)
    with onednn_conv3d_inference(net):
        net(x).sum().backward()  # gradients on: PyTorch's own (differentiable) path, same gradients
    got = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    with torch.no_grad(), onednn_conv3d_inference(net, enabled=False):
        assert "aten::mkldnn_convolution" not in _conv_kernels(lambda: net(x))


def test_trainers_validate_through_the_context():
    from ssl_nnunet.nnunet_trainers.nnUNetTrainer_SSLFinetune import (nnUNetTrainer_SSLFinetune,
                                                                      nnUNetTrainer_SSLFinetune_CPU300)
    from ssl_nnunet.nnunet_trainers.nnUNetTrainer_SSLSmoke import nnUNetTrainer_SSLSmoke
    from ssl_nnunet.utilities.cpu_inference import CPUValidationMixin
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for cls in (nnUNetTrainer_SSLSmoke, nnUNetTrainer_SSLFinetune, nnUNetTrainer_SSLFinetune_CPU300):
        mro = cls.__mro__
        # the mixin wraps nnU-Net's own validation (comes before it in the MRO)
        assert mro.index(CPUValidationMixin) < mro.index(nnUNetTrainer)

    seen = {}

    class Base:
        def perform_actual_validation(self, save_probabilities=False):
            seen["patched"] = all("_conv_forward" in m.__dict__ for m in self.network.modules()
                                  if isinstance(m, nn.Conv3d))
            return "done"

    class T(CPUValidationMixin, Base):
        device = torch.device("cpu")
        network = _net()

    assert T().perform_actual_validation() == "done" and seen["patched"]
    assert not any("_conv_forward" in m.__dict__ for m in T.network.modules())
