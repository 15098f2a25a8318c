"""Load (or create) the student and make sure it speaks the teacher's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from softlabels.data.dataset import load_tokenizer
from softlabels.data.errors import UserError


def _config_from_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def same_tokenizer(a, b) -> bool:
    return a is not None and b is not None and a.get_vocab() == b.get_vocab()


def check_tokenizers(student_tok, data_tok, student: str, data: str) -> None:
    if data_tok is None:
        raise UserError(f"{data} has no tokenizer/ folder; regenerate it with softlabels generate")
    if student_tok is not None and not same_tokenizer(student_tok, data_tok):
        raise UserError(
            f"student {student} uses a different tokenizer than the teacher that wrote {data}: "
            "this needs the teacher's tokenizer (start it from a config to use the dataset's)"
        )


def load_model(path, trust_remote_code: bool = False):
    """An HF causal LM from a folder, fp32, without running anything the folder holds: weights
    only from safetensors (pickled .bin weights can execute code), and the folder's own Python
    (auto_map) only with trust_remote_code."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    use_safetensors=True,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            why = "needs to run its own code (auto_map); pass --trust-remote-code if you trust it"
        elif not any(Path(path).glob("*.safetensors")):
            why = ("has no *.safetensors weights; pickled weights can run code when loaded: "
                   "convert them once with save_pretrained in an environment you trust")
        else:
            why = f"cannot be loaded ({str(e).splitlines()[0]})"
        raise UserError(f"model {path} {why}") from e


def load_student(student: str, data, trust_remote_code: bool = False,
                 tokenizer: str | None = None):
    """-> (model, tokenizer). `student`: an HF causal-LM folder (its own tokenizer if it has one),
    or a JSON/YAML model config (the dataset's tokenizer, or the folder `tokenizer`); `data`: a
    dataset folder, or several. A tokenizer other than the datasets' makes the training
    cross-tokenizer (train.py decides and says so)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(student)
    folders = [data] if isinstance(data, (str, Path)) else list(data)
    data_tok = load_tokenizer(folders[0])
    if data_tok is None:
        raise UserError(f"{folders[0]} has no tokenizer/ folder; regenerate it with softlabels "
                        "generate")
    tok = None
    if tokenizer is not None:
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"--student-tokenizer {tokenizer} cannot be loaded "
                            f"({str(e).splitlines()[0]})") from e
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"student {path} has no config.json; pass a save_pretrained folder "
                            "or a model config file")
        if tok is None:
            try:
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            except (OSError, ValueError):
                tok = None
        model = load_model(path, trust_remote_code)
    elif path.is_file():
        d = _config_from_file(path)
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise UserError(f"student config {path} has no model_type (e.g. \"llama\")")
        d.setdefault("vocab_size", len(tok or data_tok))
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d))
    else:
        raise UserError(f"student {path} does not exist; pass a model folder or a config file")
    tok = tok or data_tok
    check_student(model, tok)
    return model, tok


def check_student(model, tokenizer) -> None:
    """What every front end (`train`, `eval`, `DistillationTrainer`) refuses of a student before
    its first step, in one line: a family whose output head softlabels does not know (its loss
    would be computed on other logits than its forward gives), and fewer output rows than its
    tokenizer has tokens (an IndexError inside the forward, a device assert on a GPU)."""
    from softlabels.data.heads import logit_transform

    logit_transform(model.config, "student")
    vocab = model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None and vocab < len(tokenizer):
        raise UserError(f"student vocabulary {vocab} is smaller than its tokenizer's "
                        f"{len(tokenizer)}; set vocab_size >= {len(tokenizer)}")


def add_lora(model, r: int, alpha: float, targets: tuple[str, ...]):
    """Inject LoRA adapters into `model` in place (base weights frozen); return the PeftModel,
    whose merge_and_unload() gives back a plain model with the adapters folded in.

    The trainer keeps calling the base model's decoder and output head directly (the chunked
    lm_head), which the in-place injection makes adapter-aware."""
    from peft import LoraConfig, get_peft_model

    target = targets[0] if list(targets) == ["all-linear"] else list(targets)
    try:
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                target_modules=target))
    except ValueError as e:  # e.g. no module matches
        raise UserError(f"--lora-targets {' '.join(targets)}: {e}") from e
