"""Train the shipped SAE for the embedded model with sae-lens, from text available offline.

Corpus (documented in docs/sae.md): English Wikipedia prose from the shortened dump
that the `gensim` wheel ships as test data (CC-BY-SA 3.0), plus chat-formatted turns
in the model's own template (questions about those articles, answered by article text
and by the model itself), so the SAE sees the format the probes use.
"""

from __future__ import annotations

import bz2
import html
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .specs import SAETrainSpec  # noqa: F401  (re-exported)
from .activations import chat_eval_texts, collect_activations
from .models import cache_dir

logger = logging.getLogger(__name__)

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_VERSION = "4.4.0"

QUESTION_FORMS = (
    "What is {t}?", "Tell me about {t}.", "Can you explain {t} in simple terms?", "Give me a short summary of {t}.",
    "Why is {t} important?", "What should a beginner know about {t}?", "Write two sentences about {t}.",
    "How would you describe {t} to a child?", "What are the main facts about {t}?", "I'm curious about {t}. Where do I start?",
    "Is {t} still relevant today?", "What is the history of {t}?", "Explain the controversy around {t}, if any.",
    "List three things people get wrong about {t}.", "How does {t} affect everyday life?", "quick question: what's {t}",
)


# ---------------------------------------------------------------- corpus
def fetch_wiki_dump(dest: Path) -> Path:
    """Download the gensim wheel (no install) and extract only the Wikipedia test dump."""
    out = dest / "enwiki-shortened.xml.bz2"
    if out.exists():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"gensim=={GENSIM_VERSION}", "-d", tmp]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(WIKI_MEMBER)
    out.write_bytes(data)
    return out


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"<ref[^>]*/>"), " "),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), " "),
    (re.compile(r"\{\|.*?\|\}", re.S), " "),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), " "),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"&[a-z]+;"), " "),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth += 1
            i += 2
        elif text.startswith("}}", i) and depth:
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wiki_articles(path: Path) -> list[tuple[str, list[str]]]:
    """(title, prose paragraphs) per article, markup stripped."""
    raw = bz2.decompress(path.read_bytes()).decode("utf-8", "ignore")
    pages = re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", raw, re.S)
    articles = []
    for title, body in pages:
        body = _strip_templates(html.unescape(body))
        for pat, rep in _MARKUP:
            body = pat.sub(rep, body)
        paras = []
        for para in body.split("\n"):
            para = re.sub(r"\s+", " ", para).strip()
            if len(para) >= 200 and not para.startswith(("=", "*", "|", "!", "#")):
                paras.append(para)
        if paras and ":" not in title:
            articles.append((title, paras))
    return articles


def build_corpus(model: Any, tok: Any, spec: SAETrainSpec, work: Path) -> tuple[list[str], dict[str, Any]]:
    """Prose paragraphs plus chat-formatted turns; returns texts and a description."""
    rng = np.random.default_rng(spec.seed)
    articles = wiki_articles(fetch_wiki_dump(work))
    prose = [p for _, paras in articles for p in paras]
    titles = [t for t, _ in articles]
    chats: list[str] = []
    for title, paras in articles:
        q = QUESTION_FORMS[int(rng.integers(len(QUESTION_FORMS)))].format(t=title)
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": paras[0][:600]}]
        chats.append(tok.apply_chat_template(msgs, tokenize=False))
    questions = [QUESTION_FORMS[int(rng.integers(len(QUESTION_FORMS)))].format(t=titles[int(rng.integers(len(titles)))])
                 for _ in range(spec.generated_answers)]
    chats.extend(generate_answers(model, tok, questions))
    texts = prose + chats
    order = rng.permutation(len(texts))
    meta = {
        "sources": {
            "wikipedia": f"English Wikipedia, shortened dump shipped as test data in the gensim {GENSIM_VERSION} wheel "
                         f"({WIKI_MEMBER}); CC-BY-SA 3.0",
            "chat": "questions about those articles in the model's chat template, answered by article text "
                    "and by the model's own greedy answers",
        },
        "articles": len(articles),
        "prose_paragraphs": len(prose),
        "chat_turns": len(chats),
        "generated_answers": len(questions),
    }
    return [texts[i] for i in order], meta


@torch.no_grad()
def generate_answers(model: Any, tok: Any, questions: list[str], batch: int = 32, new_tokens: int = 48) -> list[str]:
    tok.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(questions), batch), desc="model answers", leave=False):
        qs = questions[i : i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in qs]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for q, row in zip(qs, gen[:, enc["input_ids"].shape[1]:]):
            ans = tok.decode(row, skip_special_tokens=True).strip()
            out.append(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": ans}], tokenize=False))
    return out


# ---------------------------------------------------------------- training
def _batches(acts: torch.Tensor, batch: int, seed: int, scale: float = 1.0) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(perm) - batch + 1, batch):
            yield acts[perm[i : i + batch]].float() * scale


def sae_quality(sae: Any, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Fraction of variance explained, mean L0 and dead-latent share on held-out activations."""
    sse, sst, l0, fired = 0.0, 0.0, 0.0, None
    mean = acts.float().mean(0)
    with torch.no_grad():
        for i in range(0, len(acts), chunk):
            x = acts[i : i + chunk].float()
            z = sae.encode(x)
            rec = sae.decode(z)
            sse += float(((x - rec) ** 2).sum())
            sst += float(((x - mean) ** 2).sum())
            l0 += float((z > 0).sum())
            f = (z > 0).any(0)
            fired = f if fired is None else fired | f
    return {"fve": 1 - sse / sst, "l0": l0 / len(acts), "dead_fraction": float(1 - fired.float().mean()), "n_eval_tokens": len(acts)}


def fit_sae(train_acts: torch.Tensor, spec: SAETrainSpec, d_in: int, out_dir: Path) -> Any:
    """Train a TopK SAE with sae-lens on cached activations, save it, and return the inference SAE
    loaded back from disk (so what is measured is what ships)."""
    from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainerConfig

    torch.manual_seed(spec.seed)
    metadata = SAEMetadata(hook_name=spec.hook_name, model_name="SmolLM2-135M-Instruct", model_class_name="LlamaForCausalLM",
                           context_size=spec.ctx, prepend_bos=False, dataset_path="see smda_training.json")
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=spec.d_sae, k=spec.k, metadata=metadata))
    # Train at unit scale (mean norm √d_in) and fold the factor into the weights before saving: on the
    # raw residual (median norm ~170) Adam at this lr leaves FVE near 0.3 (measured), scaled it learns.
    sample = train_acts[:200_000].float()
    scale = float(d_in**0.5 / sample.norm(dim=-1).mean())
    with torch.no_grad():
        sae.b_dec.data = sample.mean(0) * scale
    steps = len(train_acts) * spec.epochs // spec.batch
    cfg = SAETrainerConfig(
        total_training_samples=steps * spec.batch, train_batch_size_samples=spec.batch, lr=spec.lr,
        lr_end=spec.lr_end, lr_scheduler_name="cosineannealing", lr_decay_steps=steps,
        dead_feature_window=spec.dead_feature_window, feature_sampling_window=200, device="cpu",
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10,
    )
    trained = SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(train_acts, spec.batch, spec.seed, scale)).fit()
    trained.fold_activation_norm_scaling_factor(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.save_inference_model(str(out_dir))
    return SAE.load_from_disk(str(out_dir))


def train_sae(out_dir: Path, spec: SAETrainSpec | None = None, model_dir: str | None = None) -> dict[str, Any]:
    """Build the corpus, collect activations (cached, so a restart skips it), train, evaluate, save."""
    from ..features import CARDS, KINDS
    from .cards import build_cards
    from .models import load_model

    spec = spec or SAETrainSpec()
    work = cache_dir() / "sae-work"
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(model_dir)
    model.eval()
    acts_file = work / f"acts_L{spec.layer}_{spec.tokens}_{spec.seed}.pt"
    corpus_file = work / f"corpus_{spec.seed}.json"
    if corpus_file.exists():
        saved = json.loads(corpus_file.read_text())
        texts, meta = saved["texts"], saved["meta"]
    else:
        texts, meta = build_corpus(model, tok, spec, work)
        corpus_file.write_text(json.dumps({"texts": texts, "meta": meta}))
    if acts_file.exists():
        acts = torch.load(acts_file, weights_only=True)
    else:
        # fp32 on purpose: bf16 matmuls are ~7x slower on CPUs without avx512_bf16
        acts = collect_activations(model, tok, texts, spec.layer, spec.tokens, spec.ctx)
        torch.save(acts, acts_file)
    n_eval = max(len(acts) // 10, 1000)
    train_acts, eval_acts = acts[n_eval:], acts[:n_eval]
    meta["tokens_total"] = int(len(acts))

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    sae_inf = fit_sae(train_acts, spec, model.config.hidden_size, out_dir)
    train_s = time.perf_counter() - t0
    quality = sae_quality(sae_inf, eval_acts)
    chat_acts = collect_activations(model, tok, chat_eval_texts(tok), spec.layer, None, spec.ctx)
    quality["fve_chat"] = sae_quality(sae_inf, chat_acts)["fve"]
    quality["n_chat_tokens"] = len(chat_acts)
    # cards from the held-out texts (the first ones: their tokens are the evaluation slice)
    cards = build_cards(sae_inf, model, tok, texts, spec.layer, n_tokens=n_eval)
    (out_dir / CARDS).write_text(json.dumps(cards))
    (out_dir / "feature_labels.json").write_text(json.dumps({j: c["label"] for j, c in cards.items()}))
    quality["kinds"] = {k: sum(c["kind"] == k for c in cards.values() if c["label"] != "dead") for k in KINDS}
    record = {"spec": asdict(spec), "corpus": meta, "quality": quality, "train_seconds": round(train_s, 1),
              "sae_lens_version": __import__("sae_lens").__version__}
    (out_dir / "smda_training.json").write_text(json.dumps(record, indent=2))
    logger.info("SAE quality: %s", quality)
    return record
