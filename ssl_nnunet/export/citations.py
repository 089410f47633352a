"""Citations written into a bundle (``citations`` of the checkpoint and of ``config.json``).

The entry format is the one nnU-Net master's ``PretrainedTrainer.print_citations`` reads from an nnssl
checkpoint: ``{"type": ..., "name": ..., "apa_citations": [...]}``.
"""
from __future__ import annotations

from typing import Dict, List

_NNUNET = {"type": "framework", "name": "nnU-Net", "apa_citations": [
    "Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a "
    "self-configuring method for deep learning-based biomedical image segmentation. Nature Methods, 18(2), 203-211."]}
_RESENC = {"type": "architecture", "name": "ResidualEncoderUNet (nnU-Net ResEnc)", "apa_citations": [
    "Isensee, F., Wald, T., Ulrich, C., Baumgartner, M., Roy, S., Maier-Hein, K., & Jaeger, P. F. (2024). nnU-Net "
    "Revisited: A Call for Rigorous Validation in 3D Medical Image Segmentation. MICCAI 2024."]}
_METHODS: Dict[str, List[str]] = {
    "mae": ["He, K., Chen, X., Xie, S., Li, Y., Dollar, P., & Girshick, R. (2022). Masked Autoencoders Are Scalable "
            "Vision Learners. CVPR 2022.",
            "Wald, T., Ulrich, C., Suprijadi, J., Ziegler, S., Nohel, M., Peretzke, R., Kohler, G., & Maier-Hein, "
            "K. H. (2025). Revisiting MAE pre-training for 3D medical image segmentation. CVPR 2025."],
    "mim": ["Zhuang, J., Wu, L., Wang, Q., Fei, P., Vardhanabhuti, V., Luo, L., & Chen, H. (2025). MiM: Mask in "
            "Mask Self-Supervised Pre-Training for 3D Medical Image Analysis. IEEE Transactions on Medical "
            "Imaging."],
    "voco": ["Wu, L., Zhuang, J., & Chen, H. (2024). VoCo: A Simple-yet-Effective Volume Contrastive Learning "
             "Framework for 3D Medical Image Analysis. CVPR 2024."],
    "gvsl": ["He, Y., Yang, G., Ge, R., Chen, Y., Coatrieux, J.-L., Wang, B., & Li, S. (2023). Geometric Visual "
             "Similarity Learning in 3D Medical Image Self-supervised Pre-training. CVPR 2023."],
    "alice": ["Jiang, Y., Sun, M., Guo, H., Bai, X., Yan, K., Lu, L., & Xu, M. (2023). Anatomical Invariance "
              "Modeling and Semantic Alignment for Self-supervised Learning in 3D Medical Image Analysis. "
              "ICCV 2023."],
}


def bundle_citations(method: str, arch_class_name: str) -> List[dict]:
    """nnU-Net, the architecture (ResEnc only) and the pretraining method, if it is one of ssl_nnunet's."""
    out = [dict(_NNUNET)]
    if arch_class_name.endswith("ResidualEncoderUNet") or arch_class_name == "ResEncL":
        out.append(dict(_RESENC))
    if method in _METHODS:
        out.append({"type": "pretraining", "name": method, "apa_citations": list(_METHODS[method])})
    return out
