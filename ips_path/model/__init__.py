"""The IPS model: patch encoders, the cross-attention aggregator, iterative patch selection, training step."""

from .aggregator import CrossAttentionAggregator
from .chunks import PatchChunk, rechunk
from .encoders import FeatureProjector, PixelNormalizer, ResNet, SmallCNN, build_encoder, load_weights
from .ips import IPSModel, SlidePrediction, train_step
from .positional import grid_encoding, sinusoidal_encoding
from .selection import Selection
from .tasks import Task, compute_loss, task_losses

__all__ = [
    "CrossAttentionAggregator", "FeatureProjector", "IPSModel", "PatchChunk", "PixelNormalizer", "ResNet",
    "Selection", "SlidePrediction", "SmallCNN", "Task", "build_encoder", "compute_loss", "grid_encoding",
    "load_weights", "rechunk", "sinusoidal_encoding", "task_losses", "train_step",
]
