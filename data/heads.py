"""Each model family's output head: the transform between the head's matmul and its logits.

Both sides build logits from final hidden states a chunk at a time instead of calling the
model's forward (the teacher from vLLM's hidden states, the student so that (tokens, vocab)
logits never exist at once), so both must apply what the family's forward applies after
`lm_head`. One table for both: a student trained on the logits its saved model does not give
would train and report the wrong numbers without a word.
"""

from __future__ import annotations

from dataclasses import dataclass

from softlabels.data.errors import UserError

# model_type -> (the transform after the head's matmul, the config attribute of its factor). A
# family missing here is refused: its head might scale or cap logits in a way these targets would
# silently miss. Each entry was read off its *ForCausalLM.forward in transformers 5.19
# (models/<family>/modeling_<family>.py, the line `logits = self.lm_head(...)` and the one after):
# plain lm_head for the first group; gemma2/gemma3/gemma3n cap (`final_logit_softcapping`);
# cohere/cohere2 multiply by `logit_scale`, falcon_h1 by `lm_head_multiplier`; granite and
# granitemoe(hybrid) divide by `logits_scaling`.
PLAIN = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
         "gemma", "olmo2", "gpt2", "gpt_neox",
         # the large teachers distilled from today
         "deepseek_v2", "deepseek_v3",  # DeepSeek-V3 / R1, Kimi-K2 (model_type deepseek_v3)
         "gpt_oss", "llama4_text", "glm4", "glm4_moe", "qwen3_next", "ministral", "ministral3",
         "olmo3", "smollm3", "exaone4", "ernie4_5", "ernie4_5_moe", "seed_oss")
TRANSFORMS = {
    **{t: ("none", None) for t in PLAIN},
    **{t: ("softcap", "final_logit_softcapping")  # cap * tanh(x / cap)
       for t in ("gemma2", "gemma3", "gemma3_text", "gemma3n_text")},
    "cohere": ("scale", "logit_scale"),  # x * factor
    "cohere2": ("scale", "logit_scale"),
    "falcon_h1": ("scale", "lm_head_multiplier"),
    **{t: ("divide", "logits_scaling") for t in ("granite", "granitemoe", "granitemoehybrid")},
}


@dataclass(frozen=True)
class LogitTransform:
    """What a family's forward does to `lm_head(h)`; called on fp32 logits (any tensor type)."""

    kind: str = "none"  # none | softcap | scale | divide
    factor: float | None = None

    def __call__(self, x):
        if not self.factor:  # an unset cap (Gemma 3 checkpoints) or factor: the plain head
            return x
        if self.kind == "softcap":
            return self.factor * (x / self.factor).tanh()
        if self.kind == "scale":
            return x * self.factor
        return x / self.factor


def logit_transform(config, role: str = "teacher") -> LogitTransform:
    """The LogitTransform of a transformers config, or a one-line UserError for a family whose
    head softlabels does not know (`role` names the model in it)."""
    text = config.get_text_config()
    if text.model_type not in TRANSFORMS:
        raise UserError(
            f"{role} architecture {text.model_type!r}: softlabels does not know how its output "
            f"head turns hidden states into logits (it knows {', '.join(sorted(TRANSFORMS))}); "
            "add it to softlabels/data/heads.py TRANSFORMS")
    kind, attr = TRANSFORMS[text.model_type]
    return LogitTransform(kind, getattr(text, attr, None) if attr else None)


PLAIN_HEAD = LogitTransform()


def decoder_of(model):
    """The module under a causal LM's head, whose output is the final hidden states.
    `get_decoder()` gives it for most families; for some (Llama 4's text model) it returns the
    causal LM itself, whose output has logits and no hidden states."""
    d = model.get_decoder()
    return d if d is not model else model.model
