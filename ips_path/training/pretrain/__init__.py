"""Self-supervised pretraining of patch encoders on a lab's own tile stores (``ipspath pretrain``)."""

from ips_path.training.pretrain.run import (
    WEIGHTS_FILE,
    PretrainConfig,
    PretrainResult,
    pretrain,
    read_pretrain_identity,
)

__all__ = ["WEIGHTS_FILE", "PretrainConfig", "PretrainResult", "pretrain", "read_pretrain_identity"]
