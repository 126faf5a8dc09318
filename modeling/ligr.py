"""LiGR-style gated transformer (``model.architecture=ligr``) as a Hugging Face causal LM.

The block of eSASRec (Tikhonovich et al., RecSys 2025, arXiv 2508.06450), built on LinkedIn's LiGR
layer: pre-norm, and a sigmoid gate on each residual branch computed from the branch's raw
(un-normalised) input::

    h = x + sigmoid(W1 x + b1) * Dropout(CausalMHA(LN1(x)))
    y = h + sigmoid(W2 h + b2) * Dropout(FFN(LN2(h)))
    FFN(z) = W_out Dropout(SiLU(W_a z) * (W_b z))          (SwiGLU, no biases)

Around the blocks: token embeddings + learned absolute position embeddings, embedding dropout, and a
final LayerNorm (eSASRec has none; a pre-norm stack's residual stream is never normalised otherwise,
so the tied output head would score un-normalised states). The output head is tied to the token
embeddings. There is no KV cache: ``use_cache`` is accepted and ignored, so ``generate`` is not
offered (recommenders rank all items with one forward pass).

Module names follow Llama's (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``,
``model.layers``, ``model.norm``), so LoRA's Llama targets and PEFT/serving tools recognise them; the
residual gates are ``attn_gate`` / ``ffn_gate``.

This file is self-contained (torch and transformers only): exports copy it next to their weights
(``auto_map`` in config.json), so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
loads an export without recgpt installed. Imported as part of recgpt it registers itself with the
Auto classes instead (:func:`register_auto_classes`), and recgpt never runs the export's copy.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

MODEL_TYPE = "recgpt_ligr"


class LiGRConfig(PretrainedConfig):
    """Shape and regularisation of a :class:`LiGRForCausalLM` (transformers >= 5 configs are dataclasses:
    the annotated class attributes below are the constructor's keyword arguments)."""

    model_type = MODEL_TYPE

    vocab_size: int = 2000
    """Rows of the (tied) token embedding."""
    hidden_size: int = 64
    """Width d of the residual stream."""
    num_hidden_layers: int = 2
    """Gated blocks."""
    num_attention_heads: int = 2
    """Attention heads (must divide hidden_size)."""
    intermediate_size: int = 128
    """Hidden width of the SwiGLU FFN."""
    max_position_embeddings: int = 1024
    """Rows of the learned position embedding: the longest input."""
    dropout: float = 0.1
    """Dropout on the embeddings (after adding positions) and on both residual branches."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    activation_dropout: float = 0.1
    """Dropout inside the FFN, on SiLU(W_a z) * (W_b z)."""
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    """Std of the normal initialisation of every linear and embedding weight (biases start at 0, so
    every gate starts at sigmoid(0) = 0.5)."""
    use_cache: bool = False
    """Accepted for API compatibility; the model keeps no KV cache."""
    tie_word_embeddings: bool = True
    """The LM head is the token embedding matrix."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )


class LiGRAttention(nn.Module):
    """Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config: LiGRConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B, T, d]; ``mask`` bool [B, 1, T, T] (True = may attend) or None for plain causal
        attention. Returns [B, T, d]."""
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, T, hd]

        out = F.scaled_dot_product_attention(
            heads(self.q_proj),
            heads(self.k_proj),
            heads(self.v_proj),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class LiGRMLP(nn.Module):
    """SwiGLU without biases: ``down_proj(Dropout(SiLU(gate_proj z) * up_proj z))``."""

    def __init__(self, config: LiGRConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]."""
        return self.down_proj(self.dropout(F.silu(self.gate_proj(z)) * self.up_proj(z)))


class LiGRBlock(GradientCheckpointingLayer):
    """One gated pre-norm block (the formula in the module docstring); ``attn_gate`` = (W1, b1),
    ``ffn_gate`` = (W2, b2), both d x d with bias."""

    def __init__(self, config: LiGRConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = LiGRAttention(config)
        self.attn_gate = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = LiGRMLP(config)
        self.ffn_gate = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]; ``mask`` as :meth:`LiGRAttention.forward`'s."""
        x = hidden_states
        # The gates read the raw stream (x, h), not the normalised branch input: LiGR's gating.
        h = x + torch.sigmoid(self.attn_gate(x)) * self.dropout(self.self_attn(self.attn_norm(x), mask))
        return h + torch.sigmoid(self.ffn_gate(h)) * self.dropout(self.mlp(self.ffn_norm(h)))


class LiGRPreTrainedModel(PreTrainedModel):
    """Shared settings. Weights are initialised by transformers' default ``_init_weights``: normal(0,
    ``initializer_range``) for linear and embedding weights, zero biases, LayerNorm (1, 0) — also
    under ZeRO-3, where ``_from_config`` runs it gathered on rank 0."""

    config_class = LiGRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LiGRBlock"]


def causal_padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """bool [B, 1, T, T] mask for SDPA (True = may attend): query i sees keys j <= i that are real
    tokens (``attention_mask`` [B, T], 1 = real), and always itself, so a padded query never has an
    empty row (SDPA returns NaN for those; what a padded position outputs is never used). None
    without ``attention_mask`` (plain causal attention)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len], got shape {tuple(attention_mask.shape)}")
    device = attention_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    keys = attention_mask.bool()[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=device)
    return causal & keys


class LiGRModel(LiGRPreTrainedModel):
    """The transformer body: embeddings -> gated blocks -> final LayerNorm (no head)."""

    def __init__(self, config: LiGRConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([LiGRBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """Final hidden states [B, T, d] (``last_hidden_state``, after the final LayerNorm).

        ``inputs_embeds`` [B, T, d] are token embeddings only (positions are added here, as GPT-2 does);
        ``attention_mask`` [B, T] (1 = real token); ``position_ids`` [B, T] default to 0..T-1, right
        for the right-padded batches recgpt builds. ``use_cache`` is ignored (no KV cache);
        ``output_hidden_states`` also returns the stream before each block and the final output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        length = inputs_embeds.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device)[None]
        hidden = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        mask = causal_padding_mask(attention_mask, length)
        states: list[torch.Tensor] = []
        for block in self.layers:
            if output_hidden_states:
                states.append(hidden)
            hidden = block(hidden, mask)
        hidden = self.norm(hidden)
        if output_hidden_states:
            states.append(hidden)
        all_states = tuple(states) if output_hidden_states else None
        if return_dict is False:
            return tuple(v for v in (hidden, all_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=all_states)


class LiGRForCausalLM(LiGRPreTrainedModel):
    """:class:`LiGRModel` + an LM head tied to its token embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LiGRConfig) -> None:
        super().__init__(config)
        self.model = LiGRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple:
        """Logits [B, T, vocab_size]; with ``labels`` [B, T] (-100 = ignored) also the next-token
        cross-entropy (labels are shifted inside, as for every HF causal LM)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        if return_dict is False:
            return tuple(v for v in (loss, logits, out.hidden_states) if v is not None)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve ``model_type``
    ``recgpt_ligr`` to these classes (idempotent), and have ``save_pretrained`` copy this file into the
    saved directory with an ``auto_map`` pointing at it (for loading without recgpt)."""
    AutoConfig.register(MODEL_TYPE, LiGRConfig, exist_ok=True)
    AutoModel.register(LiGRConfig, LiGRModel, exist_ok=True)
    AutoModelForCausalLM.register(LiGRConfig, LiGRForCausalLM, exist_ok=True)
    LiGRConfig.register_for_auto_class()
    LiGRForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# recgpt's copy registers itself. The copy in an export directory, loaded by transformers as remote code
# (module transformers_modules.*), must not: it would re-point recgpt_ligr at its own classes for the
# rest of the process; transformers resolves it through auto_map instead.
if not __name__.startswith("transformers_modules"):
    register_auto_classes()
