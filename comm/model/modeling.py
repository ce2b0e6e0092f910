"""`CommForConditionalGeneration` and its headless `CommModel`, laid out as Llava: towers, mergers, aligners, LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from comm.model.aligners import linear_projection, mlp_aligner
from comm.model.configuration import CommConfig
from comm.model.head import check_head, transform_logits
from comm.model.loss import labelled_causal_lm_loss
from comm.model.merge import LLNLayerscale
from comm.model.positions import GridPositionEmbedding, image_position_ids
from comm.model.towers import FrozenVisionTower

# The image inputs of `forward` (what `CommProcessor` returns under these names): each tower's pixel values.
PIXEL_VALUES_CLIP = "pixel_values_clip"
PIXEL_VALUES_DINO = "pixel_values_dino"
PIXEL_INPUTS = (PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO)
# The vision side of `CommModel`, in the order an image goes through it (also reachable on the top model).
VISION_MODULES = (
    "clip_tower",
    "dino_tower",
    "clip_merger",
    "dino_merger",
    "clip_projection",
    "dino_aligner",
    "projector",
    "image_position_embedding",
)

# Checkpoints keep the layout COMM had before `CommModel` (``clip_tower.*``, ``language_model.model.*``,
# ``language_model.lm_head.*``...): these renamings load them, and `save_pretrained` writes it back (transformers
# reverses the renamings on save unless ``save_original_format=False``), as for Llava.
register_checkpoint_conversion_mapping(
    CommConfig.model_type,
    [
        WeightRenaming(r"^language_model.lm_head", "lm_head"),
        WeightRenaming(r"^language_model", "model.language_model"),
        *(WeightRenaming(rf"^{name}", f"model.{name}") for name in VISION_MODULES),
    ],
    overwrite=True,
)
register_checkpoint_conversion_mapping(
    "CommModel", [WeightRenaming(r"^language_model.model", "language_model")], overwrite=True
)


@dataclass
class CommImageOutput(BaseModelOutputWithPooling):
    r"""What `CommModel.get_image_features` returns.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(num_images, tokens, fused_width)`):
            The towers' merged and aligned features, concatenated: the projector's input.
        pooler_output (`torch.Tensor` of shape `(num_images, num_image_tokens, llm_width)`):
            The visual tokens that replace the ``<im_patch>`` placeholders in the LLM's input.
        hidden_states (`tuple(torch.Tensor)`, *optional*, with `output_hidden_states=True`):
            The CLIP tower's hidden states (embeddings, then each built block, every token), then the DINOv2 tower's.
        attentions (`tuple(torch.Tensor)`, *optional*, with `output_attentions=True` under eager attention):
            The CLIP tower's attention weights per block, then the DINOv2 tower's.
        clip_hidden_states / dino_hidden_states / clip_attentions / dino_attentions:
            The same, one tower each.
    """

    clip_hidden_states: tuple[torch.Tensor, ...] | None = None
    dino_hidden_states: tuple[torch.Tensor, ...] | None = None
    clip_attentions: tuple[torch.Tensor, ...] | None = None
    dino_attentions: tuple[torch.Tensor, ...] | None = None


def _joined(first: tuple | None, second: tuple | None) -> tuple | None:
    return None if first is None or second is None else (*first, *second)


class CommPreTrainedModel(PreTrainedModel):
    """Weight initialisation, loading and capability flags shared by COMM models."""

    config: CommConfig
    config_class = CommConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> CommPreTrainedModel:
        """Load like any `PreTrainedModel`, then re-freeze the towers (loading makes fresh parameters)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.freeze_towers()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        # The towers and the LLM are PreTrainedModels and bring their own init. The LM head starts as a causal LM's.
        # The modules between the towers and the LLM get PyTorch's fan-in init (as LLaVA's projector keeps): the usual
        # N(0, 0.02) scales features by 0.02 * sqrt(width) per layer, so over the merger -> aligner -> projector
        # chain a narrow model would feed the LLM an image ~100x fainter than its text and learn to ignore it.
        if isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config.text_config, "initializer_range", 0.02))
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LLNLayerscale):
            init.constant_(module.layer_scale, module.scale_init)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ) -> None:
        # The LLM's decoder layers are checkpointed, ``every_n_layers`` counting them alone. The towers' modules take
        # the flag too, as transformers gives it to every module that has one, but are never re-run: a tower stays in
        # eval mode under torch.no_grad(), where a GradientCheckpointingLayer runs plainly.
        self.get_decoder()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, every_n_layers=every_n_layers
        )
        for tower in (self.clip_tower, self.dino_tower):
            for module in tower.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module._gradient_checkpointing_func = gradient_checkpointing_func
                    module.gradient_checkpointing = enable


class CommModel(CommPreTrainedModel):
    """COMM without its LM head (like transformers' ``LlavaModel``): towers, mergers, aligners, projector and the
    LLM's decoder body; its output is the LLM's last hidden states.

    Vision path, per image: each frozen tower gives the patch tokens of its chosen layers pooled to
    ``grid x grid``; LLN-Layerscale merges them per tower; DINOv2 goes through the MLP aligner and CLIP
    through a linear projection; the two are concatenated (channels or sequence) and projected to the
    LLM's width. The result replaces the embeddings of the ``<im_patch>`` placeholder tokens; without pixel values
    placeholders are embedded as the tokens they are.
    """

    def __init__(self, config: CommConfig):
        super().__init__(config)
        clip_dim = config.clip_config.hidden_size
        dino_dim = config.dino_config.hidden_size
        self.clip_tower = FrozenVisionTower(
            config.clip_config, config.clip_layers, config.grid_size, config.clip_config.image_size
        )
        self.dino_tower = FrozenVisionTower(
            config.dino_config, config.dino_layers, config.grid_size, config.dino_image_size
        )
        scale_kwargs = {"scale_init": config.layerscale_init, "softmax": config.layerscale_softmax}
        self.clip_merger = LLNLayerscale(len(config.clip_layers), clip_dim, **scale_kwargs)
        self.dino_merger = LLNLayerscale(len(config.dino_layers), dino_dim, **scale_kwargs)
        self.clip_projection = linear_projection(clip_dim, clip_dim)
        self.dino_aligner = mlp_aligner(dino_dim, clip_dim, config.dino_aligner_depth, config.dino_aligner_ratio)
        fused_dim = 2 * clip_dim if config.concat == "channel" else clip_dim
        self.projector = nn.Linear(fused_dim, config.text_config.hidden_size)
        self.image_position_embedding = (
            GridPositionEmbedding(config.grid_size, config.text_config.hidden_size)
            if config.image_position_embedding
            else None
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def trainable_vision_modules(self) -> dict[str, nn.Module]:
        """The modules between the towers and the LLM (what a projector-only stage trains)."""
        modules = {name: getattr(self, name) for name in VISION_MODULES if not name.endswith("_tower")}
        return {name: module for name, module in modules.items() if module is not None}

    def freeze_towers(self) -> None:
        """Freeze both towers (no gradients, eval mode); called again after towers are swapped in."""
        for tower in (self.clip_tower, self.dino_tower):
            tower.requires_grad_(False)
            tower.eval()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values_clip: torch.Tensor,
        pixel_values_dino: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> CommImageOutput:
        """The images' visual tokens (``pooler_output``, ``(num_images, num_image_tokens, llm_width)``), the
        projector's input (``last_hidden_state``) and, when asked, the towers' hidden states and attentions."""
        if pixel_values_clip.shape[0] != pixel_values_dino.shape[0]:
            raise ValueError(
                f"got {pixel_values_clip.shape[0]} CLIP images but {pixel_values_dino.shape[0]} DINOv2 images"
            )
        # Unset flags follow the config, as a transformers vision tower reads its own (config.output_attentions...).
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        clip_out = dino_out = None
        if output_hidden_states or output_attentions:
            flags = {"output_hidden_states": bool(output_hidden_states), "output_attentions": bool(output_attentions)}
            clip_layers, clip_out = self.clip_tower.encode(pixel_values_clip, **flags)
            dino_layers, dino_out = self.dino_tower.encode(pixel_values_dino, **flags)
        else:
            clip_layers, dino_layers = self.clip_tower(pixel_values_clip), self.dino_tower(pixel_values_dino)
        clip = self.clip_projection(self.clip_merger(clip_layers))
        dino = self.dino_aligner(self.dino_merger(dino_layers))
        fused = torch.cat([clip, dino], dim=-1 if self.config.concat == "channel" else 1)
        towers: dict[str, Any] = {}
        if clip_out is not None:
            towers = {
                "clip_hidden_states": clip_out.hidden_states,
                "dino_hidden_states": dino_out.hidden_states,
                "clip_attentions": clip_out.attentions,
                "dino_attentions": dino_out.attentions,
            }
        tokens = self.projector(fused)
        if self.image_position_embedding is not None:
            tokens = self.image_position_embedding(tokens)
        return CommImageOutput(
            last_hidden_state=fused,
            pooler_output=tokens,
            hidden_states=_joined(towers.get("clip_hidden_states"), towers.get("dino_hidden_states")),
            attentions=_joined(towers.get("clip_attentions"), towers.get("dino_attentions")),
            **towers,
        )

    def placeholders(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)``: True at the ``<im_patch>`` placeholders (from ``input_ids``, or their embedding)."""
        token = self.config.image_token_index
        if token is None:
            raise ValueError("config.image_token_index is not set: the model has no image placeholder token")
        if input_ids is not None:
            return input_ids == token
        placeholder = self.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Where the visual tokens go, ``(batch, seq, 1)``: the ``<im_patch>`` placeholders (from ``input_ids``, or
        their embedding in ``inputs_embeds``); their number must match the images' visual tokens."""
        mask = self.placeholders(input_ids, inputs_embeds)
        count, expected = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if count > expected and mask.shape[0] == 1:
            # Assisted decoding runs the prompt and the candidate tokens in one forward, batch 1: placeholders after
            # the images' own are generated tokens, embedded as the text they are.
            mask = mask & (mask.cumsum(-1) <= expected)
            count = expected
        if count != expected:
            raise ValueError(
                f"the text has {count} image placeholder tokens but {image_features.shape[0]} images give {expected} "
                f"visual tokens ({image_features.shape[1]} each)"
            )
        return mask.unsqueeze(-1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_clip: torch.Tensor | None = None,
        pixel_values_dino: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        """The LLM's last hidden states on text whose ``<im_patch>`` tokens are replaced by the images' visual tokens
        (``image_outputs``: `get_image_features`'s output)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if (pixel_values_clip is None) != (pixel_values_dino is None):
            raise ValueError("pass both pixel_values_clip and pixel_values_dino")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if position_ids is None and self.config.image_positions == "shared":
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("with image_positions='shared', pass position_ids to continue a cache (generate does)")
            position_ids = image_position_ids(self.placeholders(input_ids, inputs_embeds), attention_mask)
        image_outputs = None
        if pixel_values_clip is not None:
            image_outputs = self.get_image_features(pixel_values_clip, pixel_values_dino)
            features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]))
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class CommForConditionalGeneration(CommPreTrainedModel, GenerationMixin):
    """The COMM multimodal LLM (arXiv 2310.08825): `CommModel` under ``model`` and the LLM's head as ``lm_head``.

    The LM head is a bias-free linear layer whose output is scaled or softcapped as the LLM's own causal LM does it
    (`comm.model.head`). The vision modules and the LLM's decoder body are reachable here too (``model.clip_merger``
    or ``clip_merger``, ``language_model``...). Assigning a causal LM to ``language_model`` puts its decoder body
    in ``model.language_model`` and its head in ``lm_head``.
    """

    # With labels (training), apply the LM head and the loss only at the labelled positions (`comm.model.loss`):
    # same loss and gradients as the full-logits loss, a fraction of its logits memory and head FLOPs.
    # False computes every position's logits and transformers' causal-LM loss (the reference tests compare with);
    # config.loss_weighting="sample" always takes the labelled-positions loss, which implements it.
    labelled_logits_only: bool = True
    # Tensor parallelism shards the head by vocabulary like the LLM's own causal LM (and Llava): with tied weights the
    # head is the embedding's parameter, which the LLM's plan shards too.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: CommConfig):
        check_head(config.text_config)
        super().__init__(config)
        self.model = CommModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        embeddings = self._embedding_name()
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embeddings}.weight"}
        self.post_init()

    def _embedding_name(self) -> str:
        embeddings = self.model.get_input_embeddings()
        return next(name for name, module in self.model.language_model.named_modules() if module is embeddings)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "language_model":
            self._set_language_model(value)
        elif name in VISION_MODULES and "model" in self._modules:
            setattr(self.model, name, value)
        else:
            super().__setattr__(name, value)

    def _set_language_model(self, value: nn.Module) -> None:
        head = value.get_output_embeddings() if isinstance(value, PreTrainedModel) else None
        if head is None:
            self.model.language_model = value
            return
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"COMM's LM head is a linear layer without bias; {type(value).__name__}'s is {head}")
        self.model.language_model = value.get_decoder()
        self.lm_head = head

    @property
    def language_model(self) -> nn.Module:
        """The LLM's decoder body (``model.language_model``)."""
        return self.model.language_model

    @property
    def clip_tower(self) -> FrozenVisionTower:
        """``model.clip_tower``."""
        return self.model.clip_tower

    @property
    def dino_tower(self) -> FrozenVisionTower:
        """``model.dino_tower``."""
        return self.model.dino_tower

    @property
    def clip_merger(self) -> LLNLayerscale:
        """``model.clip_merger``."""
        return self.model.clip_merger

    @property
    def dino_merger(self) -> LLNLayerscale:
        """``model.dino_merger``."""
        return self.model.dino_merger

    @property
    def clip_projection(self) -> nn.Linear:
        """``model.clip_projection``."""
        return self.model.clip_projection

    @property
    def dino_aligner(self) -> nn.Sequential:
        """``model.dino_aligner``."""
        return self.model.dino_aligner

    @property
    def projector(self) -> nn.Linear:
        """``model.projector``."""
        return self.model.projector

    @property
    def image_position_embedding(self) -> GridPositionEmbedding | None:
        """``model.image_position_embedding`` (None unless ``config.image_position_embedding``)."""
        return self.model.image_position_embedding

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def trainable_vision_modules(self) -> dict[str, nn.Module]:
        """The modules between the towers and the LLM (what a projector-only stage trains)."""
        return self.model.trainable_vision_modules()

    def freeze_towers(self) -> None:
        """Freeze both towers (no gradients, eval mode); called again after towers are swapped in."""
        self.model.freeze_towers()

    def get_image_features(
        self,
        pixel_values_clip: torch.Tensor,
        pixel_values_dino: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> CommImageOutput | tuple:
        """`CommModel.get_image_features`: ``pooler_output`` holds the visual tokens fed to the LLM."""
        return self.model.get_image_features(
            pixel_values_clip,
            pixel_values_dino,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=return_dict,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LLM's logits of its last hidden states: the LM head, scaled or softcapped as the LLM does it."""
        return transform_logits(self.lm_head(hidden_states), self.config.text_config)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_clip: torch.Tensor | None = None,
        pixel_values_dino: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_weight: torch.Tensor | None = None,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        """Run the LLM on text whose ``<im_patch>`` tokens are replaced by the images' visual tokens.

        With ``labels``, ``logits`` holds only the labelled positions' (``(num_labelled, vocab)``, float32; see
        `labelled_logits_only`); without, the usual ``(batch, seq, vocab)`` (``logits_to_keep`` applies).
        ``loss_weight`` ``(batch,)`` multiplies each sample's loss (the collator passes its training file's weight).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values_clip=pixel_values_clip,
            pixel_values_dino=pixel_values_dino,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        sample_weighted = self.config.loss_weighting == "sample"
        labelled = self.labelled_logits_only or sample_weighted or loss_weight is not None
        if labels is not None and shift_labels is None and labelled:
            loss, logits = labelled_causal_lm_loss(
                hidden_states,
                labels,
                self.compute_logits,
                num_items_in_batch,
                weighting=self.config.loss_weighting,
                sample_weights=loss_weight,
            )
        else:
            logits = self.compute_logits(slice_logits_to_keep(hidden_states, logits_to_keep))
            if labels is not None or shift_labels is not None:
                loss = self.loss_function(
                    logits=logits,
                    labels=labels,
                    vocab_size=self.config.text_config.vocab_size,
                    num_items_in_batch=num_items_in_batch,
                    shift_labels=shift_labels,
                )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args, is_first_iteration: bool = False, **kwargs
    ):
        """Pass the images on the prefill step only; later steps read them from the KV cache.

        Decode steps get the new tokens' embeddings instead of their ids: nothing image-related runs after the
        prefill (no placeholder check, so no host sync and a step that compiles as one graph), and a generated
        ``<im_patch>`` is just a token. A prefill that continues a returned cache gets only the images whose
        placeholders are not in the cache yet, whether all the conversation's images are passed again or only new ones.
        """
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        if self.config.image_positions == "shared" and inputs.get("position_ids") is not None:
            # transformers counts one position per token; recount the whole text so far, keep the new tokens'.
            full = image_position_ids(input_ids == self.config.image_token_index, kwargs.get("attention_mask"))
            inputs["position_ids"] = full[:, -inputs["position_ids"].shape[-1] :]
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in PIXEL_INPUTS:
                inputs.pop(key, None)
            if inputs.get("input_ids") is not None and inputs.get("inputs_embeds") is None:
                inputs["inputs_embeds"] = self.get_input_embeddings()(inputs.pop("input_ids"))
            return inputs
        cache = inputs.get("cache")
        new_ids = inputs.get("input_ids")
        if inputs.get(PIXEL_VALUES_CLIP) is None or new_ids is None or cache is None or cache.get_seq_length() == 0:
            return inputs
        keep = self._images_after_cache(input_ids, new_ids, inputs[PIXEL_VALUES_CLIP].shape[0])
        if keep is not None:
            for key in PIXEL_INPUTS:
                if inputs.get(key) is not None:
                    inputs[key] = inputs[key][keep] if len(keep) else None
        return inputs

    def _images_after_cache(
        self, all_ids: torch.LongTensor, new_ids: torch.LongTensor, num_images: int
    ) -> torch.LongTensor | None:
        """Indices of the images whose placeholders are in ``new_ids`` (the part of ``all_ids`` not in the cache)
        when ``num_images`` are all of ``all_ids``'s images, in order; None when they are not (passed as given)."""
        token, per_image = self.config.image_token_index, self.config.num_image_tokens
        in_rows = (all_ids == token).sum(-1) // per_image
        if int(in_rows.sum()) != num_images or new_ids.shape[-1] == all_ids.shape[-1]:
            return None
        new_in_rows = (new_ids == token).sum(-1) // per_image
        ends = in_rows.cumsum(0)
        ranges = [torch.arange(int(end) - int(new), int(end)) for end, new in zip(ends, new_in_rows)]
        return torch.cat(ranges).to(all_ids.device)


AutoConfig.register(CommConfig.model_type, CommConfig, exist_ok=True)
AutoModel.register(CommConfig, CommModel, exist_ok=True)
AutoModelForImageTextToText.register(CommConfig, CommForConditionalGeneration, exist_ok=True)
