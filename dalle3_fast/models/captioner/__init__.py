"""The CoCa captioner of the recaptioning stage: ViT + attentional pooler, unimodal and multimodal
text decoders, contrastive + captioning loss, greedy/beam/nucleus decoding with a KV cache."""
from dalle3_fast.models.captioner.config import CoCaConfig
from dalle3_fast.models.captioner.decoding import GenerationOutput
from dalle3_fast.models.captioner.deepen import deepen_multimodal_decoder
from dalle3_fast.models.captioner.model import CoCa

__all__ = ["CoCa", "CoCaConfig", "GenerationOutput", "deepen_multimodal_decoder"]
