"""vit: the Vision Transformer as a small, pure PyTorch library (no Ray, no MLflow).

from vit import ViTConfig, VisionTransformer
model = VisionTransformer(ViTConfig.from_name("B/16", num_classes=10, image_size=224))
"""

from vit.config import VARIANTS, Preprocessing, ViTConfig
from vit.model import VisionTransformer

__all__ = ["VARIANTS", "Preprocessing", "ViTConfig", "VisionTransformer"]
