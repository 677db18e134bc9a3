"""Export to PyTorch diffusers: the pipeline folder loads and matches JAX, the delta reproduces it.

Two "ablations" of the shipped toy model stand in for trained runs (no training needed): the
``xattn_kv`` group with noise added to every cross-attention key/value kernel, and the
``embedding`` group with noise added to the rows of the target token ("smiley"; the anchor is
"circle"). The command-line test makes a real orbax checkpoint of such parameters.
"""

import filecmp
import importlib.util
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from tiny_models import rel_err

from ablate_jax import checkpointing, export, sharding, toy
from ablate_jax import config as config_lib
from ablate_jax import params as params_lib
from ablate_jax.export import ExportError
from ablate_jax.text_to_image import SamplingConfig, draw, initial_latents, latent_shape, tokenize
from ablate_jax.workdir import open_workdir

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(toy.shipped_path("pipeline"))
PROMPTS = ["a red smiley on a striped background", "a blue circle on a dotted background"]


def make_config(group: str, **overrides):
    spec = importlib.util.spec_from_file_location(f"{group}_config", REPO / "configs" / f"{group}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def perturbed(selection, params, seed: int, scale: float):
    """``params`` with noise of ``scale`` times each trained leaf's spread added to the trained part."""
    rng = np.random.default_rng(seed)
    trainable = selection.split(params)
    noisy = {k: v + scale * float(np.std(v)) * rng.standard_normal(v.shape).astype(np.float32)
             for k, v in trainable.items()}
    return selection.merge(params, noisy), noisy


@pytest.fixture(scope="module", params=["xattn", "embedding"])
def run(request, toy_pipe, tmp_path_factory):
    """An exported "ablation": config, selection, ablated params, workdir and export folder."""
    config = make_config(request.param)
    selection = checkpointing.selection_for(config, toy_pipe, config_lib.concept_from_config(config))
    ablated, _ = perturbed(selection, toy_pipe.params, seed=1, scale=0.5)
    workdir = tmp_path_factory.mktemp(request.param)
    out = export.export_run(config, workdir, pipeline=toy_pipe, ablated_params=ablated)
    return dict(config=config, selection=selection, ablated=ablated, workdir=workdir, out=out)


def torch_pipeline(path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_and_metadata(run, toy_pipe):
    out, config, selection = run["out"], run["config"], run["selection"]
    assert out == run["workdir"] / "export"
    assert sorted(p.name for p in run["workdir"].iterdir()) == ["export"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "export.json", "pipeline"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.rglob("*"))  # readable by others, like the source
    record = json.loads((out / "export.json").read_text())
    fp = config_lib.fingerprint(config, *config_lib.TRAIN_KEYS)
    assert record["checkpoint_step"] is None and record["config_hash"] == fp["hash"]
    assert record["components_replaced"] == (["text_encoder"] if config.params == "embedding" else ["unet"])

    tensors, meta = export.read_delta(out / "delta.safetensors")
    assert meta["params_group"] == config.params and meta["config_hash"] == fp["hash"]
    assert meta["checkpoint_step"] == "null" and meta["base_model"] == "toy"
    assert json.loads(meta["concept"])["targets"] == ["smiley"]
    assert json.loads(meta["config"]) == json.loads(json.dumps(fp["fields"], default=str))
    manifest = json.loads(meta["base_manifest"])
    assert meta["base_sha256"] == export.combined_sha256(manifest)
    # Every tensor of the component the delta touches is in the manifest, not only the replaced ones.
    component = "text_encoder" if config.params == "embedding" else "unet"
    assert {n.split(".", 1)[0] for n in manifest} == {component}
    assert len(manifest) == len(params_lib.flatten(toy_pipe.params[component]))
    if config.params == "embedding":
        name = "text_encoder.text_model.embeddings.token_embedding.weight"
        assert sorted(tensors) == [name + "@row_ids", name + "@rows"]
        assert tensors[name + "@row_ids"].tolist() == list(selection.rows) == [629]
        assert tensors[name + "@rows"].shape == (1, 64)
    else:
        assert len(tensors) == len(selection.paths) == 14
        assert all(k.startswith("unet.") and k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in tensors)
    replaced = {export.identity_name(*k.removesuffix("@rows").split(".", 1)) for k in tensors if not k.endswith("@row_ids")}
    assert replaced <= set(manifest)


def test_untrained_tensors_are_bit_identical_to_the_source(run):
    out = run["out"] / "pipeline"
    delta, _ = export.read_delta(run["out"] / "delta.safetensors")
    for folder in sorted(p for p in SOURCE.iterdir() if p.is_dir()):
        replaced = any(k.startswith(folder.name + ".") for k in delta)
        names = sorted(p.name for p in folder.iterdir())
        assert sorted(p.name for p in (out / folder.name).iterdir()) == names
        for name in names:
            if not (replaced and name.endswith(".safetensors")):
                assert filecmp.cmp(folder / name, out / folder.name / name, shallow=False), (folder.name, name)
                continue
            src = safetensors.numpy.load_file(folder / name)
            dst = safetensors.numpy.load_file(out / folder.name / name)
            assert sorted(src) == sorted(dst)
            changed = 0
            for key, value in src.items():
                assert dst[key].dtype == value.dtype and dst[key].shape == value.shape, key
                full = f"{folder.name}.{key}"
                if full in delta:
                    np.testing.assert_array_equal(dst[key], delta[full])
                    changed += not np.array_equal(dst[key], value)
                elif full + "@rows" in delta:
                    rows = delta[full + "@row_ids"]
                    np.testing.assert_array_equal(dst[key][rows], delta[full + "@rows"])
                    assert not np.array_equal(dst[key][rows], value[rows])
                    np.testing.assert_array_equal(np.delete(dst[key], rows, 0), np.delete(value, rows, 0))
                    changed += 1
                else:
                    np.testing.assert_array_equal(dst[key], value, err_msg=key)  # bit-identical
            assert changed == len({k.removesuffix("@row_ids").removesuffix("@rows") for k in delta})
    assert (out / "model_index.json").read_bytes() == (SOURCE / "model_index.json").read_bytes()


def jax_forward(pipe, params, ids, x, t):
    # One compiled program: op-by-op eager dispatch would compile each of the UNet's ops separately.
    states = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
    return states, pipe.unet.apply({"params": params["unet"]}, x, t, states)


def test_pytorch_loads_the_export_and_matches_jax(run, toy_pipe):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = run["out"] / "pipeline"
    unet, info = UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    text, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    params = run["ablated"]
    ids = tokenize(toy_pipe, PROMPTS)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([500, 120])
    with jax.default_matmul_precision("highest"), torch.no_grad():
        states, eps = jax.jit(jax_forward, static_argnums=0)(toy_pipe, params, ids, x, t)
        ref_states = text(torch.from_numpy(np.asarray(ids)).long())[0]
        ref_eps = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), ref_states).sample
    text_err = rel_err(states, ref_states.numpy())
    unet_err = rel_err(eps, ref_eps.permute(0, 2, 3, 1).numpy())
    print(f"{run['config'].params}: text encoder rel. error {text_err:.2e}, UNet rel. error {unet_err:.2e}")
    assert text_err <= 1e-5 and unet_err <= 1e-5


def test_pytorch_images_match_ablate_jax(run, toy_pipe):
    cfg = SamplingConfig(sampler="ddim", num_steps=4, guidance_scale=6.0, eta=0.0)
    latents = np.asarray(initial_latents(jax.random.key(5), np.arange(len(PROMPTS)), latent_shape(toy_pipe, cfg)))
    one_device = sharding.make_mesh(jax.devices()[:1])  # a smaller program to compile than 8-way sharded
    with jax.default_matmul_precision("highest"):
        ours, base = (draw(toy_pipe, p, PROMPTS, jax.random.key(0), cfg, latents=latents, mesh=one_device,
                               batch_size=2, output_type="float") for p in (run["ablated"], toy_pipe.params))
    ref = torch_pipeline(run["out"] / "pipeline")
    with torch.no_grad():
        theirs = ref(PROMPTS, latents=torch.from_numpy(latents.copy()).permute(0, 3, 1, 2), num_inference_steps=4,
                     guidance_scale=6.0, eta=0.0, output_type="np").images
    err = rel_err(ours, theirs)
    print(f"{run['config'].params}: image rel. error {err:.2e}, max abs {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert err <= 1e-3
    assert np.abs(ours[0] - base[0]).max() > 0.05  # the ablation changed the target's image


def test_base_plus_delta_in_pytorch_equals_the_full_export(run):
    full = torch_pipeline(run["out"] / "pipeline")
    patched = torch_pipeline(SOURCE)
    assert export.apply_delta_torch(patched, run["out"] / "delta.safetensors") is patched
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(patched, name).state_dict(), getattr(full, name).state_dict()
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_apply_delta_in_jax_equals_the_ablated_params(run, toy_pipe):
    applied = params_lib.flatten(export.apply_delta(toy_pipe.params, run["out"] / "delta.safetensors"))
    want = params_lib.flatten(run["ablated"])
    assert sorted(applied) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(applied[key]), np.asarray(value), err_msg=key)


def test_a_delta_for_another_base_is_refused(run, toy_pipe):
    delta = run["out"] / "delta.safetensors"
    flat = params_lib.flatten(toy_pipe.params)
    # Change one base value that the delta replaces (xattn: a to_k kernel; embedding: the target's row).
    if run["config"].params == "embedding":
        path, row = run["selection"].paths[0], run["selection"].rows[0]
        flat[path] = np.asarray(flat[path]).copy()
        flat[path][row, 0] += 1e-3
    else:
        path = next(p for p in run["selection"].paths if p.endswith("attn2/to_k/kernel"))
        flat[path] = np.asarray(flat[path]) * 1.001
    other = params_lib.unflatten(flat)
    with pytest.raises(ExportError, match="made for another base model"):
        export.apply_delta(other, delta)
    forced = params_lib.flatten(export.apply_delta(other, delta, base_identity_check=False))
    np.testing.assert_array_equal(np.asarray(forced[path]), np.asarray(params_lib.flatten(run["ablated"])[path]))

    pipe = torch_pipeline(SOURCE)
    module = pipe.text_encoder if run["config"].params == "embedding" else pipe.unet
    before = {k: v.clone() for k, v in module.state_dict().items()}
    name = next(k for k in before if k.endswith("token_embedding.weight" if run["config"].params == "embedding"
                                                else "attn2.to_k.weight"))
    with torch.no_grad():
        module.get_parameter(name).view(-1)[run["selection"].rows[0] * 64 if run["selection"].rows else 0] += 1e-3
    with pytest.raises(ExportError, match="made for another base model"):
        export.apply_delta_torch(pipe, delta)
    after = module.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) == 1  # nothing written but our own change

    with pytest.raises(ExportError, match="not an ablate_jax delta"):
        export.apply_delta(toy_pipe.params, SOURCE / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_base_that_differs_only_where_the_delta_does_not_write_is_refused(run, toy_pipe):
    """One ResNet weight (UNet runs) or one position embedding (text encoder runs) changed, far from
    anything the delta replaces: the delta's manifest covers the whole component."""
    delta = run["out"] / "delta.safetensors"
    flat = params_lib.flatten(toy_pipe.params)
    embedding = run["config"].params == "embedding"
    path = next(p for p in flat if (p.endswith("position_embedding/embedding") if embedding
                                    else "resnets_0/conv1/kernel" in p))
    flat[path] = np.asarray(flat[path]).copy()
    flat[path].reshape(-1)[0] += 1e-3
    with pytest.raises(ExportError, match=r"made for another base model: (unet|text_encoder)\.\S+ differs"):
        export.apply_delta(params_lib.unflatten(flat), delta)

    pipe = torch_pipeline(SOURCE)
    module = pipe.text_encoder if embedding else pipe.unet
    name = next(k for k in module.state_dict() if (k.endswith("position_embedding.weight") if embedding
                                                   else "resnets.0.conv1.weight" in k))
    with torch.no_grad():
        module.get_parameter(name).view(-1)[0] += 1e-3
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ExportError, match="made for another base model"):
        export.apply_delta_torch(pipe, delta)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing written


def test_a_base_in_a_narrower_dtype_is_refused_for_that_reason(run):
    pipe = torch_pipeline(SOURCE).to(torch.float16)
    with pytest.raises(ExportError, match=r"held in float16 but the delta was made from float32 weights"):
        export.apply_delta_torch(pipe, run["out"] / "delta.safetensors")


def test_an_existing_export_is_kept_refused_or_replaced(toy_pipe, tmp_path, caplog, monkeypatch):
    config = make_config("xattn")
    selection = checkpointing.selection_for(config, toy_pipe, config_lib.concept_from_config(config))
    first, _ = perturbed(selection, toy_pipe.params, seed=2, scale=0.1)
    out = export.export_run(config, tmp_path, pipeline=toy_pipe, ablated_params=first)
    record = (out / "export.json").read_bytes()
    stamp = (out / "delta.safetensors").stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="ablate_jax"):
        assert export.export_run(config, tmp_path, pipeline=toy_pipe, ablated_params=first) == out
    assert "already exported" in caplog.text
    assert (out / "delta.safetensors").stat().st_mtime_ns == stamp

    second, values = perturbed(selection, toy_pipe.params, seed=3, scale=0.1)
    with pytest.raises(ExportError, match="another run.*--overwrite"):
        export.export_run(config, tmp_path, pipeline=toy_pipe, ablated_params=second)
    with pytest.raises(ExportError, match="--overwrite"):  # another config: refused as well
        export.export_run(make_config("xattn", **{"train.learning_rate": 1e-3}), tmp_path, pipeline=toy_pipe,
                          ablated_params=first)
    assert (out / "export.json").read_bytes() == record and (out / "delta.safetensors").stat().st_mtime_ns == stamp

    # A write that fails after the temporary folder is full leaves the previous export as it was.
    def crash(folder):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(export, "_make_readable", crash)
        with pytest.raises(OSError, match="disk full"):
            export.export_run(config, tmp_path, pipeline=toy_pipe, ablated_params=second, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (out / "export.json").read_bytes() == record

    assert export.export_run(config, tmp_path, pipeline=toy_pipe, ablated_params=second, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or old folder left
    delta, _ = export.read_delta(out / "delta.safetensors")
    path = selection.paths[0]
    key = "unet." + export.flax_path_to_torch_key(tuple(path.split("/")[1:]))
    np.testing.assert_array_equal(delta[key], np.asarray(values[path]).T)


def test_command_line_exports_the_latest_checkpoint(toy_pipe, tmp_path, capsys):
    config = make_config("xattn")
    selection = checkpointing.selection_for(config, toy_pipe, config_lib.concept_from_config(config))

    def save_checkpoint(step, seed):
        _, values = perturbed(selection, toy_pipe.params, seed=seed, scale=0.1)
        open_workdir(config, tmp_path, ()).record_checkpoints()
        state = checkpointing.initial_state(values, checkpointing.optimizer_for(config))
        state["step"] = np.int32(step)
        mngr = checkpointing.manager(tmp_path)
        checkpointing.save(mngr, step, state, {"step": step, "examples_seen": step * 8})
        mngr.wait_until_finished()
        return values

    def cli(*extra):
        code = export.main(["export", f"--config={REPO / 'configs' / 'xattn.py'}", f"--workdir={tmp_path}", *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, _, err = cli()
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: no checkpoint in"), err

    values = save_checkpoint(3, seed=4)
    code, out, err = cli()
    assert code == 0 and "exported" in out, err
    assert json.loads((tmp_path / "export" / "export.json").read_text())["checkpoint_step"] == 3
    applied = params_lib.flatten(export.apply_delta(toy_pipe.params, tmp_path / "export" / "delta.safetensors"))
    for path, value in values.items():
        np.testing.assert_array_equal(np.asarray(applied[path]), np.asarray(value))

    save_checkpoint(6, seed=5)
    code, _, err = cli()
    assert code == 1 and err.count("\n") == 1 and "--overwrite" in err, err
    code, _, _ = cli("--overwrite")
    assert code == 0 and json.loads((tmp_path / "export" / "export.json").read_text())["checkpoint_step"] == 6

    code, _, err = cli("--config.train.learning_rate=0.001")  # a foreign config for this workdir's checkpoints
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    code, _, err = cli("--config.export.nope=1")
    assert code == 1 and err.count("\n") == 1 and "nope" in err, err
