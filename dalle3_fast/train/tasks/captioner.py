"""Task ``captioner``: the CoCa captioner (contrastive + captioning loss, models/captioner).

Pre-train on alt-text (``caption_key`` "alt"), then fine-tune from that checkpoint (``init_from``) on
short synthetic captions ("ssc") or descriptive ones ("dsc"), as DALL-E 3 does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dalle3_fast.models.captioner import CoCa, CoCaConfig, deepen_multimodal_decoder

from ..task import Task, register_task
from .image_data import ImageDataOptions, image_batches, to_unit, world_captions


@register_task("captioner")
class CaptionerTask(Task):
    @dataclass
    class Options(ImageDataOptions):
        preset: str = "tiny"          # CoCaConfig preset (tiny, small, base, large) for a new model
        model_config: dict = field(default_factory=dict)  # CoCaConfig fields over the preset, e.g. {"image_stem": "conv"}
        init_from: str = ""           # a captioner directory to fine-tune (SSC / DSC stages)
        # with init_from: grow its multimodal decoder to this many layers first (deepen_multimodal_decoder:
        # new layers start as identities); 0 keeps the model's depth
        multimodal_layers: int = 0
        tokenizer: str = ""           # a tokenizer directory; "" trains one on scene-world captions
        tokenizer_vocab: int = 1000
        tokenizer_scenes: int = 2000  # scene-world scenes whose captions train that tokenizer
        caption_key: str = "alt"      # alt | ssc | dsc: which caption of each record is the target
        sample_count: int = 4
        sample_tokens: int = 40       # longest caption generated for the sample log
        # caption-loss weight of the tokens of these words (the rest weigh 1), e.g. {"left": 5, "above": 5}: rare
        # words that decide a caption's truth (spatial relations) get more of the gradient
        caption_word_weights: dict = field(default_factory=dict)
        # grounding loss weight (0: off): at the last token of every mention of a scene-world object group in the
        # caption ("... the small red circle"), a linear head on the text decoder's hidden state regresses that
        # group's centre (x, y in [-1, 1]), so the decoder learns to look up where what it names is, which
        # relations need. Needs records with a scene graph (world data or world shards); training only: the
        # exported captioner has no head
        grounding_weight: float = 0.0

    def build_model(self) -> nn.Module:
        o = self.options
        if o.init_from:
            if o.model_config:
                raise ValueError("task_options.model_config shapes a new captioner; a fine-tune (init_from) keeps "
                                 "its model's config, so remove model_config")
            model = CoCa.from_pretrained(o.init_from).train()
            if o.multimodal_layers:
                model = deepen_multimodal_decoder(model, o.multimodal_layers, seed=self.ctx.seed)
        elif o.multimodal_layers:
            raise ValueError("task_options.multimodal_layers deepens a trained captioner (init_from); a new one "
                             "takes its depth from model_config: {\"multimodal_layers\": N}")
        else:
            from dalle3_fast.models.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(o.tokenizer or self._world_tokenizer())
            preset = CoCaConfig.preset(o.preset, image_size=o.resolution).to_dict()
            model = CoCa.from_tokenizer(tokenizer, CoCaConfig.from_dict({**preset, **o.model_config}))
        if self.ctx.activation_checkpointing:
            raise ValueError("activation_checkpointing: the CoCa captioner has no checkpointing switch; set it false")
        self.tokenizer, self._max_len = model.tokenizer, model.config.max_text_len
        self._token_weights = self._word_weights(model.config.vocab_size)
        if o.grounding_weight < 0:
            raise ValueError(f"task_options.grounding_weight must be >= 0, got {o.grounding_weight}")
        return GroundedCaptioner(model) if o.grounding_weight else model

    def _word_weights(self, vocab_size: int) -> torch.Tensor | None:
        words = self.options.caption_word_weights
        if not words:
            return None
        weights = torch.ones(vocab_size)
        for word, w in words.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"task_options.caption_word_weights[{word!r}] must be a number >= 0, got {w!r}")
            ids = self.tokenizer.encode([word], max_length=self._max_len, add_bos=False, add_eos=False)
            ids = ids.ids[0, :int(ids.lengths[0])].tolist()
            if not ids or getattr(self.tokenizer, "unk_id", None) in ids:
                raise ValueError(f"task_options.caption_word_weights: {word!r} is not in the captioner's vocabulary")
            weights[ids] = float(w)
        return weights

    def _world_tokenizer(self) -> Path:
        """Train a tokenizer on scene-world captions once (rank 0), saved to OUT/tokenizer."""
        import torch.distributed as dist

        from dalle3_fast.models.tokenizer import SentencePieceTokenizer

        directory = self.ctx.out_dir / "tokenizer"
        if (not dist.is_initialized() or dist.get_rank() == 0) and not directory.is_dir():
            texts = world_captions(self.options.data_seed, self.options.tokenizer_scenes)
            SentencePieceTokenizer.train(texts, vocab_size=self.options.tokenizer_vocab).save_pretrained(directory)
        if dist.is_initialized():
            dist.barrier()
        return directory

    def batches(self, batch_size, rank, world_size, start):
        o = self.options
        for batch in image_batches(o, batch_size, rank, world_size, start, multiple=8):
            texts = []
            for r in batch["records"]:
                if r.get(o.caption_key) is None:
                    raise ValueError(f"sample {r.get('key', '?')!r} has no {o.caption_key!r} caption; "
                                     "set task_options.caption_key to one the data has")
                texts.append(r[o.caption_key])
            tokens = self.tokenizer.encode(texts, max_length=self._max_len, add_bos=True, add_eos=True)
            out = {"image": batch["image"], "ids": tokens.ids, "lengths": tokens.lengths}
            if o.grounding_weight:
                out["ground_mask"], out["ground_xy"] = self._grounding_targets(batch["records"], texts,
                                                                               tokens.ids.shape[1])
            yield out

    def _grounding_targets(self, records, texts, T):
        """(mask (B, T - 1), centres (B, T - 1, 2)): at the decoder position that has just read a mention's last
        token, the mentioned group's centre in [-1, 1]."""
        from dalle3_fast.data.world import SceneGraph
        from dalle3_fast.data.world.captions import group_mentions

        mask = torch.zeros(len(texts), T - 1, dtype=torch.bool)
        xy = torch.zeros(len(texts), T - 1, 2)
        for i, (record, text) in enumerate(zip(records, texts)):
            if not isinstance(record.get("graph"), dict):
                raise ValueError(f"task_options.grounding_weight needs a scene graph in every record; sample "
                                 f"{record.get('key', '?')!r} has none (train on world data or world shards, or set "
                                 "grounding_weight to 0)")
            graph = SceneGraph.from_dict(record["graph"])
            mentions = group_mentions(text, graph)
            if not mentions:
                continue
            centres = {}
            for o in graph.objects:
                centres.setdefault(o.key(), []).append((o.cx / graph.width * 2 - 1, o.cy / graph.height * 2 - 1))
            # the BOS-prefixed tokens of the text up to each mention: the decoder reads the last one at L - 1
            prefixes = self.tokenizer.encode([text[:end] for end, _ in mentions], max_length=self._max_len,
                                             add_bos=True, add_eos=False)
            for L, (_, group) in zip(prefixes.lengths.tolist(), mentions):
                if L - 1 < T - 1:
                    mask[i, L - 1] = True
                    xy[i, L - 1] = torch.tensor(centres[group.key]).mean(0)
        return mask, xy

    def loss(self, model, batch):
        coca = _coca(model)
        out = coca(batch["image"], batch["ids"], batch["lengths"], token_weights=self._token_weights,
                   return_decoder_hidden=bool(self.options.grounding_weight))
        logs = {"contrastive": out["contrastive"], "caption": out["caption"]}
        if not self.options.grounding_weight:
            return out["loss"], logs
        hidden = out["decoder_hidden"]
        targets = int(batch["ground_mask"].sum())  # counted on the host: no device sync
        # the head runs on every position and the mask weighs them, so no boolean indexing (a sync on a GPU)
        error = (model.grounding_head(hidden) - batch["ground_xy"].to(hidden.device, hidden.dtype)).pow(2)
        ground = (error * batch["ground_mask"].to(hidden.device).unsqueeze(-1)).sum() / (2 * max(targets, 1))
        logs["ground"] = ground.detach()
        return out["loss"] + self.options.grounding_weight * ground, logs

    def sample(self, model, step):
        model = _coca(model)
        model.eval()
        # world: a far-off batch no run trains on; shards: the first batch (skipping far would read every shard)
        start = 10_000_000 if self.options.data == "world" else 0
        batch = next(image_batches(self.options, self.options.sample_count, 0, 1, start, 8))
        images = batch["image"].to(self.ctx.device)
        lines = [json.dumps({"step": step, "caption": text, "reference": record.get(self.options.caption_key)})
                 for record, text in zip(batch["records"], model.generate(images, max_new_tokens=self.options.sample_tokens))]
        if self.ctx.rank == 0:
            (self.ctx.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            with open(self.ctx.out_dir / "samples" / "captions.jsonl", "a") as f:
                f.write("\n".join(lines) + "\n")
        return to_unit(images)

    def export(self, model, directory: Path):
        _coca(model).save_pretrained(directory)


class GroundedCaptioner(nn.Module):
    """A CoCa captioner with the grounding head the ``grounding_weight`` loss trains (x, y of a named group)."""

    def __init__(self, coca: CoCa):
        super().__init__()
        self.coca = coca
        self.grounding_head = nn.Linear(coca.config.text_width, 2)


def _coca(model: nn.Module) -> CoCa:
    return model.coca if isinstance(model, GroundedCaptioner) else model
