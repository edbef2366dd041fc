"""Data layer: records -> samples (processor), Stage 1 masking, packing/padding collation, loaders, embedded data."""

from .batch import Batch, Sample, VisionLayout, VisionSpec, collate, mrope_positions, vision_layout
from .images import ImageSpec, preprocess_image
from .processor import BadRecord, MocaProcessor

__all__ = ["Batch", "Sample", "VisionLayout", "VisionSpec", "collate", "mrope_positions", "vision_layout",
           "ImageSpec", "preprocess_image", "BadRecord", "MocaProcessor"]
