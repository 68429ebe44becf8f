"""The tiny Klein factory, both on-disk formats, loading, and the guardrails that fire before any compute."""

import json
import shutil

import pytest
import torch

from klein_core.errors import ModelError
from klein_core.model.keymap import bfl_to_diffusers_transformer, diffusers_to_bfl_transformer, ldm_to_diffusers_vae
from klein_core.model.loading import (
    TEXT_ENCODER_LAYERS,
    load_text_encoder,
    load_transformer,
    load_vae,
    resolve_model,
)
from klein_core.tools.tiny import build_tiny_components


def comfy(files):
    return resolve_model(files["transformer"], files["text_encoder"], files["vae"])


def test_tiny_transformer_keeps_what_comfyui_needs_to_recognise_flux2(tiny_diffusers):
    config = json.loads((tiny_diffusers / "transformer/config.json").read_text())
    assert config["attention_head_dim"] == 128
    assert config["in_channels"] == 128
    assert tuple(config["axes_dims_rope"]) == (32, 32, 32, 32)
    assert config["guidance_embeds"] is False


def test_tiny_text_encoder_has_layers_9_18_27(tiny_diffusers):
    config = json.loads((tiny_diffusers / "text_encoder/config.json").read_text())
    assert config["num_hidden_layers"] >= 28


def test_text_encoder_layers_are_9_18_27_not_the_flux2_dev_10_20_30():

    assert TEXT_ENCODER_LAYERS == (9, 18, 27)


def test_factory_is_deterministic_per_seed():
    a = build_tiny_components(seed=3)[0].state_dict()
    b = build_tiny_components(seed=3)[0].state_dict()
    c = build_tiny_components(seed=4)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_both_formats_load_to_identical_weights_and_outputs(tiny_diffusers, tiny_comfy_files):
    from_folder, from_files = resolve_model(tiny_diffusers), comfy(tiny_comfy_files)
    assert from_folder.variant == from_files.variant
    for load in (load_transformer, load_vae):
        a, b = load(from_folder).state_dict(), load(from_files).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    te_a, tok_a = load_text_encoder(from_folder)
    te_b, tok_b = load_text_encoder(from_files)
    ids = tok_a(["photo of kleinchar"], return_tensors="pt").input_ids
    assert torch.equal(ids, tok_b(["photo of kleinchar"], return_tensors="pt").input_ids)
    assert torch.equal(
        te_a(ids, output_hidden_states=True).hidden_states[27], te_b(ids, output_hidden_states=True).hidden_states[27]
    )

    tr_a, tr_b = load_transformer(from_folder), load_transformer(from_files)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 128, generator=g)
    txt = torch.randn(1, 8, 48, generator=g)
    img_ids = torch.zeros(1, 16, 4)
    img_ids[0, :, 1] = torch.arange(16) // 4
    img_ids[0, :, 2] = torch.arange(16) % 4
    txt_ids = torch.zeros(1, 8, 4)
    txt_ids[0, :, 3] = torch.arange(8)
    kw = dict(
        hidden_states=x,
        encoder_hidden_states=txt,
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
    )
    with torch.no_grad():
        torch.testing.assert_close(tr_a(**kw).sample, tr_b(**kw).sample, rtol=0, atol=1e-6)


def test_our_bfl_keys_convert_back_exactly_as_diffusers_single_file_converter_reads_them():
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = build_tiny_components()[0].state_dict()
    bfl = diffusers_to_bfl_transformer(state)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers_transformer(bfl)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in state)


def test_comfy_vae_file_converts_like_diffusers_ldm_converter(tiny_comfy_files):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from klein_core.tools.tiny import TINY_VAE_CONFIG

    ldm = load_file(tiny_comfy_files["vae"])
    assert "bn.running_mean" in ldm and "encoder.down.0.block.0.conv1.weight" in ldm
    config = dict(TINY_VAE_CONFIG, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    theirs = convert_ldm_vae_checkpoint(dict(ldm), config)
    ours = ldm_to_diffusers_vae(ldm)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key].reshape(tensor.shape), tensor), key


def test_model_diffusion_model_prefix_is_optional(tiny_comfy_files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_comfy_files["transformer"])
    bare = tmp_path / "flux-2-klein-base-tiny.safetensors"
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in state.items()}, bare)
    resolved = resolve_model(
        bare, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"], tiny_comfy_files["tokenizer"]
    )
    a = load_transformer(resolved).state_dict()
    b = load_transformer(comfy(tiny_comfy_files)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_transformer_with_scales_loads_dequantised(tiny_comfy_files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_comfy_files["transformer"])
    fp8 = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max() / 448.0
            fp8[key] = (tensor / scale).to(torch.float8_e4m3fn)
            fp8[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            fp8[key] = tensor
    path = tmp_path / "flux-2-klein-base-tiny-fp8.safetensors"
    save_file(fp8, path)
    resolved = resolve_model(
        path, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"], tiny_comfy_files["tokenizer"]
    )
    loaded = load_transformer(resolved).state_dict()
    reference = load_transformer(comfy(tiny_comfy_files)).state_dict()
    worst = max(((loaded[k] - reference[k]).abs().max() / (reference[k].abs().max() + 1e-12)).item() for k in reference)
    assert worst < 0.08  # e4m3 keeps ~2 significant digits


def test_a_folder_one_level_above_the_model_names_the_model_folder_inside(tiny_model):
    with pytest.raises(ModelError, match=f"no model_index.json.*did you mean {tiny_model / 'diffusers'}"):
        resolve_model(tiny_model)


def test_refuses_distilled_diffusers_folder_and_names_the_base_repo(tmp_path, tiny_diffusers):
    folder = tmp_path / "klein"
    shutil.copytree(tiny_diffusers, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, is_distilled=True)))
    with pytest.raises(ModelError, match="distilled.*base-9B"):
        resolve_model(folder)


def test_refuses_distilled_file_by_name_and_names_the_base_file(tiny_comfy_files, tmp_path):
    distilled = tmp_path / "flux-2-klein-9b.safetensors"
    shutil.copy(tiny_comfy_files["transformer"], distilled)
    with pytest.raises(ModelError, match="flux-2-klein-base-9b.safetensors"):
        resolve_model(distilled, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"])


def test_unnamed_single_file_loads_with_a_warning_to_check_it_is_base(tiny_comfy_files, tmp_path):
    renamed = tmp_path / "my_model.safetensors"
    shutil.copy(tiny_comfy_files["transformer"], renamed)
    resolved = resolve_model(renamed, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"])
    assert any("Base" in w for w in resolved.warnings)


def _save(tmp_path, name, tensors):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    "keys,named",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "Stable Diffusion"),
        ({"double_blocks.0.img_mod.lin.weight": (4, 4), "img_in.weight": (3072, 64)}, "FLUX.1"),
        (
            {
                "img_in.weight": (6144, 128),
                "txt_in.weight": (6144, 15360),
                "double_stream_modulation_img.lin.weight": (4, 4),
                "guidance_in.in_layer.weight": (4, 4),
                "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            },
            "FLUX.2 \\[dev\\]",
        ),
        ({"model.layers.0.self_attn.q_proj.weight": (4, 4)}, "text encoder"),
    ],
)
def test_refuses_non_klein_models_and_names_what_was_found(tmp_path, tiny_comfy_files, keys, named):
    path = _save(tmp_path, "flux-2-klein-base-x.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(ModelError, match=named):
        resolve_model(path, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"])


def test_truncated_file_gives_an_error_naming_the_file(tiny_comfy_files, tmp_path):
    data = tiny_comfy_files["transformer"].read_bytes()
    cut = tmp_path / "flux-2-klein-base-tiny.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="flux-2-klein-base-tiny.safetensors.*truncated"):
        resolve_model(cut, tiny_comfy_files["text_encoder"], tiny_comfy_files["vae"])


def test_garbage_file_gives_an_error_naming_the_file(tiny_comfy_files, tmp_path):
    junk = tmp_path / "qwen.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="qwen.safetensors"):
        resolve_model(tiny_comfy_files["transformer"], junk, tiny_comfy_files["vae"])


def test_text_encoder_that_does_not_match_the_transformer_names_both(tiny_comfy_files, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny_comfy_files["text_encoder"])
    wider = {k: torch.zeros([32 if d == 16 else d for d in v.shape]) for k, v in state.items()}
    path = _save(tmp_path, "qwen3-other.safetensors", wider)
    with pytest.raises(ModelError, match="qwen3-other.safetensors.*does not match.*flux-2-klein-base-tiny"):
        resolve_model(tiny_comfy_files["transformer"], path, tiny_comfy_files["vae"])


def test_vae_that_is_not_flux2_is_refused(tiny_comfy_files, tmp_path):
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(tiny_comfy_files["vae"]).items() if not k.startswith("bn.")}
    path = _save(tmp_path, "ae.safetensors", state)
    with pytest.raises(ModelError, match="ae.safetensors.*not a FLUX.2 VAE"):
        resolve_model(tiny_comfy_files["transformer"], tiny_comfy_files["text_encoder"], path)


def test_single_file_without_text_encoder_and_vae_says_which_are_missing(tiny_comfy_files):
    with pytest.raises(ModelError, match="--text-encoder and --vae"):
        resolve_model(tiny_comfy_files["transformer"])


def test_missing_tokenizer_says_where_to_put_it(tiny_comfy_files, tmp_path):
    te = tmp_path / "qwen3.safetensors"
    shutil.copy(tiny_comfy_files["text_encoder"], te)
    resolved = resolve_model(tiny_comfy_files["transformer"], te, tiny_comfy_files["vae"])
    with pytest.raises(ModelError, match="tokenizer.*--tokenizer"):
        load_text_encoder(resolved)


def test_known_sizes_are_detected_from_shapes_on_the_meta_device():
    from klein_core.model.loading import variant_from_bfl_shapes

    for hidden, doubles, singles, joint, name in ((4096, 8, 24, 12288, "9B"), (3072, 5, 20, 7680, "4B")):
        shapes = {
            "img_in.weight": (hidden, 128),
            "txt_in.weight": (hidden, joint),
            "double_stream_modulation_img.lin.weight": (6 * hidden * 2, hidden),
            "time_in.in_layer.weight": (hidden, 256),
            "double_blocks.0.img_mlp.2.weight": (hidden, 3 * hidden),
        }
        shapes.update({f"double_blocks.{i}.img_attn.qkv.weight": (3 * hidden, hidden) for i in range(doubles)})
        shapes.update({f"single_blocks.{i}.linear2.weight": (hidden, 4 * hidden) for i in range(singles)})
        variant, config = variant_from_bfl_shapes(shapes, __import__("pathlib").Path("x.safetensors"))
        assert variant.name == name
        assert config["num_attention_heads"] == hidden // 128
        from diffusers import Flux2Transformer2DModel

        with torch.device("meta"):
            model = Flux2Transformer2DModel(**config)
        assert len(model.transformer_blocks) == doubles and len(model.single_transformer_blocks) == singles


def test_cli_check_model_passes_base_and_refuses_distilled(tiny_diffusers, tmp_path, capsys):
    from klein_core.cli import main

    assert main(["check-model", "--model", str(tiny_diffusers)]) == 0
    assert "OK" in capsys.readouterr().out
    folder = tmp_path / "d"
    shutil.copytree(tiny_diffusers, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    assert main(["check-model", "--model", str(folder)]) == 2
    assert "distilled" in capsys.readouterr().err
