"""Hugging Face `transformers` models, as a user brings them: tiny random models built from configs
(no hub), padded dict batches, `ModelOutput` results through the ready-made output functions.

Every result is checked against an independent float64 reference: one unpadded sample at a time,
one `autograd.grad` per output, k^C by its eigen-decomposition formula. Skipped only where
`transformers` cannot be imported (CI installs it from the lock).
"""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import netsim
from netsim import outputs
from netsim.grads import VmapFallbackWarning

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, N = 60, 7, 6
TEXT_MODELS = ("bert", "distilbert", "roberta", "gpt2", "gpt2_lm", "llama")
MODELS = TEXT_MODELS + ("vit",)
PAD = {"roberta": 1}   # every other text model pads with 0


def tiny_model(name: str, dtype=torch.float64):
    """A 2-layer, hidden-32 model of each family, randomly initialised, in eval mode."""
    torch.manual_seed(0)
    t = transformers
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=40)
    gpt2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40, pad_token_id=0, bos_token_id=2,
                eos_token_id=2)
    model = {
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**sizes, num_labels=3)),
        "distilbert": lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40, num_labels=3)),
        "roberta": lambda: t.RobertaForSequenceClassification(t.RobertaConfig(
            **dict(sizes, max_position_embeddings=44), num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
        "gpt2": lambda: t.GPT2ForSequenceClassification(t.GPT2Config(**gpt2, num_labels=3)),
        "gpt2_lm": lambda: t.GPT2LMHeadModel(t.GPT2Config(**gpt2)),
        "llama": lambda: t.LlamaForSequenceClassification(t.LlamaConfig(
            **sizes, num_key_value_heads=2, num_labels=3, pad_token_id=0, bos_token_id=2, eos_token_id=2)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=3)),
    }[name]()
    return model.to(dtype).eval()


def samples(name: str, n: int = N, seed: int = 1, dtype=torch.float64) -> list[dict]:
    """Unpadded samples (dicts of 1-row tensors) of random lengths 3..LENGTH."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return [{"pixel_values": torch.randn(1, 1, 8, 8, generator=g, dtype=dtype)} for _ in range(n)]
    out = []
    for _ in range(n):
        length = int(torch.randint(3, LENGTH + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (1, length), generator=g)
        sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if name == "gpt2_lm":
            sample["labels"] = ids.clone()
        out.append(sample)
    return out


def pad(name: str, items: list[dict]) -> dict:
    """One batch of the samples, right-padded to the longest (what a tokenizer's padding does)."""
    if name == "vit":
        return {"pixel_values": torch.cat([s["pixel_values"] for s in items])}
    longest = max(s["input_ids"].shape[1] for s in items)
    fill = {"input_ids": PAD.get(name, 0), "attention_mask": 0, "labels": outputs.IGNORE_INDEX}
    return {k: torch.cat([torch.nn.functional.pad(s[k], (0, longest - s[k].shape[1]), value=fill[k]) for s in items])
            for k in items[0]}


def call_options(name: str) -> dict:
    if name == "gpt2_lm":
        return dict(output_fn=outputs.causal_lm_log_likelihood, targets_key="labels")
    return dict(output_fn=outputs.logits)


def reference_jacobians(model, name: str, items: list[dict], params=None) -> torch.Tensor:
    """(N, d, p): each sample alone, unpadded, one autograd.grad per output row."""
    chosen = [p for n, p in model.named_parameters() if p.requires_grad and (params is None or n.startswith(params))]
    rows = []
    for sample in items:
        inputs = {k: v for k, v in sample.items() if k != "labels"}
        out = model(**inputs)
        out = (outputs.causal_lm_log_likelihood(out, sample["labels"]) if name == "gpt2_lm"
               else outputs.logits(out)).reshape(1, -1)
        grads = []
        for a in range(out.shape[1]):
            g = torch.autograd.grad(out[0, a], chosen, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                    for gi, p in zip(g, chosen)]))
        rows.append(torch.stack(grads))
    return torch.stack(rows)


def reference_kc(Jx: torch.Tensor, Jy: torch.Tensor | None = None) -> torch.Tensor:
    """k^C by its formula Tr(K_xx^-1/2 K_xy K_yy^-1/2) / d, full-rank self-kernels."""
    def normalised(J):
        evals, evecs = torch.linalg.eigh(J @ J.mT)
        return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT @ J
    Qx = normalised(Jx)
    Qy = Qx if Jy is None else normalised(Jy)
    return torch.einsum("iap,jap->ij", Qx, Qy) / Jx.shape[1]


@pytest.fixture(scope="module")
def references():
    """{name: (model, unpadded samples, their reference Jacobians)}, built once."""
    out = {}
    for name in MODELS:
        model, items = tiny_model(name), samples(name)
        out[name] = (model, items, reference_jacobians(model, name, items))
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["auto", "layerwise", "jacobian"])
def test_a_padded_batch_equals_each_sample_alone_unpadded(references, name, method):
    """The first call a user makes, on every engine: no crash, no warning from auto, and the float64
    kernel of the padded batch equals the reference of the samples taken one by one without padding."""
    model, items, J = references[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error" if method != "jacobian" else "ignore")
        got = netsim.similarity(model, pad(name, items), method=method, **call_options(name))
    torch.testing.assert_close(got, reference_kc(J), rtol=1e-9, atol=1e-10)
    assert not got.requires_grad


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_the_jacobian_engine_warns_once_naming_the_line_it_cannot_vmap(references, name):
    """transformers' mask helpers call `.all()` on the mask (data-dependent control flow): vmap
    refuses it, so the Jacobian engine computes one sample at a time and says where, once."""
    model, items, _ = references[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        netsim.per_sample_grads(model, [pad(name, items[:3]), pad(name, items[3:])], chunk_size=2,
                                method="jacobian", **call_options(name))
    fallbacks = [w for w in caught if issubclass(w.category, VmapFallbackWarning)]
    assert len(fallbacks) == 1 and "transformers/" in str(fallbacks[0].message)
    assert not any("performance drop" in str(w.message) for w in caught)


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_padding_streams_each_length_apart(references, name):
    """A DataLoader whose collate pads each batch to its own length (DataCollatorWithPadding's way):
    batches are never joined across lengths; the kernel and the density equal the reference."""
    model, items, J = references[name]
    loader = DataLoader(items, batch_size=4, collate_fn=lambda batch: pad(name, batch))
    expected = reference_kc(J)
    torch.testing.assert_close(netsim.similarity(model, loader, chunk_size=3, **call_options(name)), expected,
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(netsim.soft_density(model, loader, chunk_size=3, **call_options(name)),
                               expected.sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["bert", "gpt2_lm", "llama"])
@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_params_selection_returns_plain_tensors_equal_to_the_reference(references, name, method):
    model, items, _ = references[name]
    prefix = {"bert": "bert.encoder.layer.1.", "gpt2_lm": "transformer.h.1.", "llama": "model.layers.1."}[name]
    J = reference_jacobians(model, name, items, params=prefix)
    batch = pad(name, items)
    options = dict(call_options(name), method=method, params=[prefix + "*"])
    k = netsim.similarity(model, batch, **options)
    density = netsim.soft_density(model, batch, **options)
    grads = netsim.per_sample_grads(model, batch, **{k: v for k, v in options.items() if k != "method"})
    for result in (k, density, grads):
        assert not result.requires_grad and result.grad_fn is None
    torch.testing.assert_close(k, reference_kc(J), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(density, reference_kc(J).sum(1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads, J, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_similarity_by_module_parts_add_up_and_match_the_reference_blocks(references, name):
    """Which layers make two inputs alike: each module's part is its block of the reference formula."""
    model, items, J = references[name]
    parts = netsim.similarity_by_module(model, pad(name, items), method="layerwise", **call_options(name))
    torch.testing.assert_close(sum(parts.values()), reference_kc(J), rtol=1e-9, atol=1e-10)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    module = next(m for m in parts if m.endswith(("attention.output.dense", "attn.c_proj", "attention.o_proj")))
    columns = torch.cat([torch.full((s,), n.rsplit(".", 1)[0] == module) for n, s in zip(names, sizes)])

    def normaliser(Jx):
        evals, evecs = torch.linalg.eigh(Jx @ Jx.mT)
        return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT
    Q = normaliser(J) @ J
    expected = torch.einsum("iap,jap->ij", Q[:, :, columns], Q[:, :, columns]) / J.shape[1]
    torch.testing.assert_close(parts[module], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["distilbert", "gpt2_lm", "llama", "vit"])
def test_the_index_holds_a_transformer_exact_and_sketched(references, tmp_path, name):
    model, items, J = references[name]
    batches = [pad(name, items[:4]), pad(name, items[4:])]
    index = netsim.SimilarityIndex.build(model, batches, tmp_path / "exact", shard_size=4, **call_options(name))
    torch.testing.assert_close(index.similarity(batches[1], targets_key=call_options(name).get("targets_key")),
                               reference_kc(J[4:], J), rtol=1e-9, atol=1e-10)
    sketched = netsim.SimilarityIndex.build(model, batches, tmp_path / "sketch", sketch=256, shard_size=4,
                                            **call_options(name))
    error = sketched.calibrate(batches, n_pairs=15, targets_key=call_options(name).get("targets_key"))
    assert error["n_pairs"] == 15 and error["max_abs_err"] < 0.5   # 256 values per gradient: coarse, unbiased


def test_a_sketched_index_never_forms_a_token_maps_gradient(references, tmp_path, monkeypatch):
    """Token maps (GPT-2's Conv1D, its tied lm_head and embedding) are sketched from per-token factors:
    beyond the engine's one-sample probe, no chunk's `(n, d, out in)` gradient is formed, building
    or querying; a tied parameter's uses are sketched alike and added."""
    from netsim import layerwise
    model, items, _ = references["gpt2_lm"]
    formed = []
    dense = layerwise.TokenFactors.dense
    monkeypatch.setattr(layerwise.TokenFactors, "dense", lambda f: formed.append(f.delta.shape[0]) or dense(f))
    batches = [pad("gpt2_lm", items[:4]), pad("gpt2_lm", items[4:])]
    index = netsim.SimilarityIndex.build(model, batches, tmp_path, sketch=64, shard_size=4, **call_options("gpt2_lm"))
    index.query(batches[1], k=2, targets_key="labels")
    kinds = {e["kind"] for e in index.manifest["sketch_plan"]["entries"]}
    assert index.manifest["engine"] == "layerwise" and "tensor" in kinds and set(formed) == {1}
    wte = [e for e in index.manifest["layout"] if "transformer.wte.weight" in e["names"]]
    assert len(wte) == 1 and wte[0]["names"] == ["transformer.wte.weight"]    # the tied pair: one entry


def test_readme_example_runs():
    """The README's Hugging Face example, as written there."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- readme-hf-example:start -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its Hugging Face example markers"
    names = {}
    exec(compile(block.group(1), "README.md Hugging Face example", "exec"), names)
    assert names["k"].shape == (8, 8) and bool((names["k"].diagonal() == 1).all())
    assert names["density"].shape == (8,) and names["nearest"].shape == (8, 3)
    assert (names["nearest"][:, 0] == torch.arange(8)).all()      # each sequence is its own nearest


# --- bad input: a clear error that says what to do ---------------------------------------------

def test_a_model_in_training_mode_is_refused():
    model = tiny_model("llama").train()   # Llama has no Dropout module: the check is on transformers' own flag
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        netsim.similarity(model, pad("llama", samples("llama")), output_fn=outputs.logits)


def test_an_output_fn_returning_the_whole_model_output_is_refused():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match="pass output_fn.*outputs.logits"):
        netsim.similarity(model, pad("bert", samples("bert")), output_fn=lambda out: out)


def test_labels_missing_under_targets_key_are_named():
    batch = pad("gpt2", samples("gpt2"))
    with pytest.raises(ValueError, match="targets_key 'labels' is not a key"):
        netsim.similarity(tiny_model("gpt2_lm"), batch, output_fn=outputs.causal_lm_log_likelihood,
                          targets_key="labels")


def test_a_mask_of_another_shape_than_the_ids_is_refused():
    batch = pad("bert", samples("bert"))
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask.*same length"):
        netsim.similarity(tiny_model("bert"), batch, output_fn=outputs.logits)


def test_token_ids_out_of_the_vocabulary_are_named():
    batch = pad("bert", samples("bert"))
    batch["input_ids"][2, 1] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"vocabulary has {VOCAB} tokens"):
        netsim.similarity(tiny_model("bert"), batch, output_fn=outputs.logits)


def test_a_shuffling_loader_is_refused_before_the_model_runs():
    loader = DataLoader(samples("bert"), batch_size=2, shuffle=True, collate_fn=lambda b: pad("bert", b))
    with pytest.raises(ValueError, match="shuffle=True"):
        netsim.soft_density(tiny_model("bert"), loader, output_fn=outputs.logits)


def test_half_precision_is_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        netsim.similarity(tiny_model("bert", torch.float16), pad("bert", samples("bert")), output_fn=outputs.logits)


def test_a_sequence_without_a_token_to_predict_is_named():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [1, -100, -100, -100]])
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\]"):
        outputs.causal_lm_log_likelihood(logits, labels)
