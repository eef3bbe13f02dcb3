"""Typed configuration: our defaults and the paper-compatible preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

KINDS = ("content", "format", "function-word", "position", "template")
"""What a latent reads: by the activating token's spelling (content, format, function-word: features.card_kind)
or by where it fires (position, template: features.behaviour_kind, which wins)."""

Pooling = Literal["mean", "max", "last", "eot"]
Scorer = Literal["prefix", "first_token"]
Target = Literal["mass", "ratio", "log_refusal", "logit"]
Method = Literal["exact", "first_order"]
Encode = Literal["sae", "dense"]
Credit = Literal["optimizer", "step"]
CreditMeasure = Literal["deconvolve", "ghost"]

SECOND_MOMENTS = ("exact", "fixed")
"""The replay's models of Adam's second moment (credit/replay.py): as the run moves it, or held at the recorded one."""

DEFAULT_REFUSALS: tuple[str, ...] = (
    "I can't",
    "I cannot",
    "I'm sorry",
    "Sorry, but",
    "I won't",
    "I'm not able",
)
DEFAULT_COMPLIANCES: tuple[str, ...] = (
    "Sure",
    "Here",
    "Certainly",
    "Of course",
    "To",
    "The",
    "Yes",
)


@dataclass
class SMDAConfig:
    """Everything that shapes X, Y, the policy and the alert rule.

    Kept JSON-serialisable so it survives checkpoints and lands in policy.json.
    """

    # --- X: SAE features ---------------------------------------------------
    n_features: int = 48
    """How many SAE latents enter the policy (selected at baseline from labels)."""
    features: list[int] | None = None
    """Explicit latent indices; overrides selection."""
    selection: Literal["score", "stable"] = "score"
    """How the n_features are chosen at baseline: `score` = the label-separation score on all probes; `stable` =
    stability selection (the latents chosen most often over `selection_resamples` half-samples of the probes;
    baseline.stable_features). On the shipped probes `stable` neither raised the nested AUROC nor made fold
    selections agree more (docs/validation.md, "Policy"), so `score` stays the default."""
    selection_resamples: int = 50
    feature_kinds: tuple[str, ...] = ("content",)
    """Which feature kinds (features.py: content, format, function-word) selection may pick, read from
    the SAE's feature cards. Form features (punctuation, question words) separate harmful from
    harmless probes whenever the two differ in form, and make a policy that says "not a question →
    refuse". SAEs without cards: every latent is eligible (one warning)."""
    alert_ignore_kinds: tuple[str, ...] = ("format", "position", "template")
    """Feature kinds the interference alert treats as noise: they never count as a step's dominant
    feature or as off-target mass."""
    pooling: Pooling = "mean"
    """How a probe's per-token activations become one row of X. `mean`/`max` run
    over the user's content tokens, `last` is the final prompt token (where the
    model decides), `eot` the end-of-user-turn token (the paper's choice)."""
    encode: Encode = "sae"
    """`sae` = the SAE's own encoder (TopK etc.); `dense` = ReLU(h·W_enc + b_enc)
    on the selected latents only (the paper's proxy)."""
    outlier_norm_ratio: float = 20.0
    """Tokens whose residual norm exceeds this multiple of the median are left out
    of pooling (BOS and rare attention-sink tokens carry norms ~100x larger)."""

    # --- Y: refusal --------------------------------------------------------
    scorer: Scorer = "prefix"
    refusal_openings: tuple[str, ...] = DEFAULT_REFUSALS
    compliance_openings: tuple[str, ...] = DEFAULT_COMPLIANCES
    prefix_tokens: int = 3
    """Teacher-forced tokens per opening for the prefix scorer."""
    target: Target = "mass"
    """`mass` = Σ P(refusal opening): the probability that the answer opens with a refusal;
    `ratio` = P(refusal)/(P(refusal)+P(compliance openings)); `log_refusal` = log Σ P(refusal
    opening) (paper); `logit` = logit of the ratio. `mass` is the default because after safety SFT
    helpful answers open with words no fixed compliance list anticipates, which drives `ratio`
    towards 1 on harmless prompts (measured on the demo: see docs/demo.md)."""

    # --- the ridge policy --------------------------------------------------
    ridge_lambda: float | None = None
    """None: chosen by generalised cross-validation at baseline, then frozen."""
    standardize: bool = True
    intercept: bool = True
    method: Method = "exact"
    cv_folds: int = 5

    # --- from steps to pairs (docs/credit.md) -------------------------------
    credit: Credit = "optimizer"
    """`optimizer`: credit each step's change to the pairs whose gradients make up its update,
    through the optimizer the Trainer built (SGD, momentum, Adam/AdamW; others fall back to `step`
    with a warning); `step`: a step's change goes to that step's pairs, split equally."""
    credit_measure: CreditMeasure = "deconvolve"
    """How the newest pair's part of a step is found under `optimizer` credit: `deconvolve` (the
    step's change minus what earlier pairs' momentum carries; no extra cost) or `ghost` (one extra
    probe pass per step with the newest gradient's part of the update applied alone; what the
    carry model misses becomes an explicit residual)."""

    # --- interference and alerts ------------------------------------------
    intended_top_m: int = 5
    """A pair's intended features: its m most active selected features (z-units)."""
    interference_threshold: float = 0.6
    noise_floor_mads: float = 3.0
    min_history: int = 10
    """Steps of |dominant Δβ| history needed before alerts can fire; 0 turns the noise floor off."""
    on_alert: str = "warn"
    """`warn` | `halt` (a user callable is passed to SMDACallback directly)."""
    patience: int = 1

    # --- cost --------------------------------------------------------------
    probe_batch_size: int = 32
    share_prefix: bool = True
    """Encode the chat header every probe shares (system prompt, user tag) once per pass
    and reuse its KV cache; same X and Y as encoding each probe in full (tested)."""
    every_n_steps: int = 1
    """Snapshot every n optimizer steps; a window's effect is credited to all pairs in it."""
    text_every_n_steps: int = 50
    """How often the symbolic policy is rendered into TensorBoard text."""
    log_to_trainer: bool = True
    """Report the scalars a user watches through `trainer.log` (needs `callback.bind(trainer)`), so every
    `report_to` integration (W&B, MLflow, trackio, Comet, TensorBoard) receives them at their step."""
    sae_dtype: str = "float32"
    """dtype the SAE runs in on the model's device; probe activations are cast to it before encoding."""
    prompt_text: str = "private"
    """Where pairs' prompt text goes: `private` (OUTPUT_DIR/_smda_private/, which `push_to_hub` never
    uploads; the readers join it back), `ledger` (inside smda/, uploaded with it), `none` (not kept)."""
    min_sae_fve: float = 0.5
    """Warn at train begin when the SAE explains less of the probes' hook activations than this."""

    # --- carried through the rest of the run (after the last step) ------------
    replay_last_steps: int = 0
    """After the last step, replay the run's last n optimizer steps in reverse mode (credit/replay.py): each step's
    predicted effect of dropping it, carried through the steps after it, on mean refusal of the harmful and of the
    harmless probes at the end; written to smda/replay.json. 0: off. The in-run credit is local (a pair's own step);
    this reader is what predicts retraining without a set of late pairs (docs/validation.md §9). Needs
    `callback.bind(trainer)`, AdamW/Adam, one batch per optimizer step and one process; refused at train begin
    otherwise. While training it keeps one state (weights and both Adam moments) on disk; after it, a double
    backward per replayed step (docs/credit.md)."""
    replay_every: int = 2
    """The replay's states in memory (`replay_every` + 1 at once): the spacing of the in-memory recomputation."""
    replay_outer: int = 16
    """The replay's checkpoint spacing on disk, a multiple of `replay_every` (files ≈ n/outer + outer/every states)."""

    def __post_init__(self) -> None:
        self.refusal_openings = tuple(self.refusal_openings)
        self.feature_kinds = tuple(self.feature_kinds)
        self.alert_ignore_kinds = tuple(self.alert_ignore_kinds)
        bad = [k for k in (*self.feature_kinds, *self.alert_ignore_kinds) if k not in KINDS]
        if bad or not self.feature_kinds:
            raise ValueError(f"feature kinds must be among {', '.join(map(repr, KINDS))} (feature_kinds non-empty); got {bad}")
        self.compliance_openings = tuple(self.compliance_openings)
        checks = {
            "pooling": ("mean", "max", "last", "eot"),
            "scorer": ("prefix", "first_token"),
            "target": ("mass", "ratio", "log_refusal", "logit"),
            "method": ("exact", "first_order"),
            "encode": ("sae", "dense"),
            "credit": ("optimizer", "step"),
            "credit_measure": ("deconvolve", "ghost"),
            "on_alert": ("warn", "halt"),
            "selection": ("stable", "score"),
            "sae_dtype": ("float32", "float64", "bfloat16", "float16"),
            "prompt_text": ("private", "ledger", "none"),
        }
        for name, allowed in checks.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SMDAConfig.{name}={value!r}: expected one of {allowed}.")
        if self.selection_resamples < 1:
            raise ValueError("SMDAConfig.selection_resamples must be >= 1.")
        if self.features is None and self.n_features < 1:
            raise ValueError("SMDAConfig.n_features must be >= 1 (or pass `features=[...]`).")
        if self.every_n_steps < 1 or self.patience < 1 or self.prefix_tokens < 1:
            raise ValueError("every_n_steps, patience and prefix_tokens must be >= 1.")
        if self.replay_last_steps < 0 or self.replay_every < 1 or self.replay_outer < 1:
            raise ValueError("SMDAConfig.replay_last_steps must be >= 0 (0: off) and replay_every, replay_outer >= 1.")
        if self.ridge_lambda is not None and self.ridge_lambda <= 0:
            raise ValueError("ridge_lambda must be > 0 (or None for GCV).")
        if self.credit_measure == "ghost" and self.every_n_steps > 1:
            raise ValueError("credit_measure='ghost' measures every step's newest gradient, so it needs every_n_steps=1; "
                             "use credit_measure='deconvolve' with every_n_steps > 1.")
        if not self.refusal_openings:
            raise ValueError("refusal_openings must not be empty.")
        if self.target in ("ratio", "logit") and not self.compliance_openings:
            raise ValueError("compliance_openings must not be empty for target='ratio'/'logit'.")

    @classmethod
    def paper(cls, **overrides: Any) -> "SMDAConfig":
        """Settings of the public reimplementation of arXiv 2606.29171.

        X at the end-of-turn token, dense ReLU proxy over ~75 features, no
        intercept or standardisation, λ = 5, Y = log Σ p(refusal prefix), first-order split.
        """
        base = dict(
            n_features=75,
            pooling="eot",
            encode="dense",
            scorer="prefix",
            prefix_tokens=3,
            target="log_refusal",
            ridge_lambda=5.0,
            standardize=False,
            intercept=False,
            method="first_order",
            credit="step",
            feature_kinds=KINDS,
            alert_ignore_kinds=(),
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refusal_openings"] = list(self.refusal_openings)
        d["compliance_openings"] = list(self.compliance_openings)
        d["feature_kinds"] = list(self.feature_kinds)
        d["alert_ignore_kinds"] = list(self.alert_ignore_kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SMDAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


__all__ = ["SMDAConfig", "DEFAULT_REFUSALS", "DEFAULT_COMPLIANCES"]
