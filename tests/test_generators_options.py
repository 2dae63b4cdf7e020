"""diffusers generator options and presets: validation without importing torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.conftest import ConfigFactory, run_and_dataset_toml
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.backends.generators.presets import PRESETS
from trig_stream.backends.registry import backend_names, build_generator
from trig_stream.errors import ConfigError, MissingExtraError
from trig_stream.manifest import Manifest


def test_upstream_defaults() -> None:
    flux = DiffusersOptions(preset="flux").spec()
    assert flux.pipeline == "FluxPipeline"
    assert flux.checkpoint == "black-forest-labs/FLUX.1-dev"
    assert flux.call == {
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 50,
        "guidance_scale": 3.5,
    }
    assert flux.dtype_for("cuda:0") == "bfloat16" and flux.dtype_for("cpu") == "float32"
    assert flux.dtype_for("cpu:1") == "float32"  # was float16: a CPU only by its exact name
    sd35 = DiffusersOptions(preset="sd35").spec().call
    assert (sd35["num_inference_steps"], sd35["guidance_scale"]) == (28, 4.5)
    sana = DiffusersOptions(preset="sana").spec()
    assert "SANA1.5_4.8B" in sana.checkpoint
    assert (sana.call["num_inference_steps"], sana.call["guidance_scale"]) == (20, 4.5)
    assert DiffusersOptions(preset="instructp2p").spec().call["num_inference_steps"] == 100
    hqedit = DiffusersOptions(preset="hqedit").spec()
    assert hqedit.inputs == "edit" and hqedit.source_size == (512, 512)
    assert hqedit.call == {
        "num_inference_steps": 30,
        "guidance_scale": 7.0,
        "image_guidance_scale": 1.5,
    }
    assert DiffusersOptions(preset="blipdiffusion").spec().inputs == "subject"
    assert {"flux", "sd35", "sana", "sdxl", "sd15", "pixart_sigma"} <= set(PRESETS)


def test_options_override_the_preset_and_call_wins() -> None:
    spec = DiffusersOptions(
        preset="flux",
        steps=28,
        height=512,
        dtype="float16",
        negative_prompt="blurry",
        call={"guidance_scale": 5.0, "max_sequence_length": 256},
        revision="main",
    ).spec()
    assert spec.call["num_inference_steps"] == 28
    assert spec.call["height"] == 512 and spec.call["width"] == 1024
    assert spec.call["guidance_scale"] == 5.0 and spec.call["max_sequence_length"] == 256
    assert spec.call["negative_prompt"] == "blurry"
    assert spec.dtype_for("cpu") == "float16"
    assert spec.load["revision"] == "main"


def test_generic_form_and_validation() -> None:
    spec = DiffusersOptions(pipeline="FluxPipeline", checkpoint="/models/x").spec()
    assert spec.inputs == "text" and spec.call == {}
    with pytest.raises(ValidationError, match="preset"):
        DiffusersOptions(pipeline="FluxPipeline")
    with pytest.raises(ValidationError, match="unknown preset 'flux2'"):
        DiffusersOptions(preset="flux2")
    with pytest.raises(ValidationError, match="Extra inputs"):
        DiffusersOptions.model_validate({"preset": "flux", "stepz": 3})
    with pytest.raises(ValidationError, match="at least one device"):
        DiffusersOptions(preset="flux", devices=[])
    # Refused at validate, not when the run loads its first pipeline.
    # "cpu:1" means nothing beyond "cpu" (and the transformers judge refused it).
    for device in ("", "gpu", "cuda:x", "cuda0", "cpu:", "cpu:1", "mps:", "mps0"):
        with pytest.raises(
            ValidationError,
            match=r"unknown device; use 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'mps:0' ",
        ):
            DiffusersOptions(preset="flux", devices=[device])
    # "mps:0" is torch's name of the MPS device, and was accepted before the rule was shared.
    DiffusersOptions(preset="flux", devices=["cpu", "cuda", "cuda:7", "mps", "mps:0"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "flux", "height": 72}, "height 72 is not a multiple of 16, as FluxPipeline"),
        ({"preset": "sd15", "width": 60}, "width 60 is not a multiple of 8, .* use 56 or 64"),
        ({"preset": "sana", "call": {"height": 1000}}, "height 1000 is not a multiple of 32"),
        (
            {"pipeline": "StableDiffusion3Pipeline", "checkpoint": "x", "height": 8},
            r"height 8 is not a multiple of 16, .* use 16 \[type",
        ),
        (  # named by its module too
            {"pipeline": "diffusers:FluxPipeline", "checkpoint": "x", "height": 72},
            "height 72 is not a multiple of 16",
        ),
    ],
)
def test_a_size_the_pipeline_cannot_make_is_refused(
    options: dict[str, object], message: str
) -> None:
    # Flux made smaller pictures than asked, silently; Stable Diffusion failed every call.
    with pytest.raises(ValidationError, match=message):
        DiffusersOptions.model_validate(options)
    DiffusersOptions.model_validate({"pipeline": "MyPipeline", "checkpoint": "x", "height": 13})


@pytest.mark.parametrize(
    ("source_size", "message"),
    [
        ([100, 60], r"source_size \[100, 60\]: its width 100 is not a multiple of 8, .*96 or 104"),
        ([96, 60], r"source_size \[96, 60\]: its height 60 is not a multiple of 8, .*56 or 64"),
    ],
)
def test_a_source_size_the_edit_pipeline_cannot_make_is_refused(
    source_size: list[int], message: str
) -> None:
    # An edit pipeline draws at its source's size: [100, 60] made 96x56 pictures, silently,
    # where height 60 was refused.
    with pytest.raises(ValidationError, match=message):
        DiffusersOptions.model_validate({"preset": "instructp2p", "source_size": source_size})
    DiffusersOptions.model_validate({"preset": "instructp2p", "source_size": [96, 64]})
    # A reference picture's size is not the picture's: any will do.
    options = {"preset": "ip_adapter_sdxl", "source_size": source_size}
    assert DiffusersOptions.model_validate(options).spec().source_size == tuple(source_size)


@pytest.mark.parametrize("preset", ["instructp2p", "ip_adapter_sdxl"])
def test_a_source_size_past_the_largest_picture_is_refused(preset: str) -> None:
    # [2**64, 512] passed validate, then every call failed in Pillow's resize ("Python int
    # too large to convert to C long"), naming no key; [65536, 65536] asked for 12 GiB.
    too_large = r"source_size\.\d\s+Input should be less than or equal to 8192"
    for source_size in ([2**64, 512], [512, 8200]):
        with pytest.raises(ValidationError, match=too_large):
            DiffusersOptions.model_validate({"preset": preset, "source_size": source_size})
    options = {"preset": preset, "source_size": [8192, 8192]}
    assert DiffusersOptions.model_validate(options).spec().source_size == (8192, 8192)


@pytest.mark.parametrize("key", ["height", "width"])
def test_a_call_size_past_the_largest_picture_is_refused(key: str) -> None:
    # call.height and call.width win over the bounded height and width, unbounded: an edit
    # pipeline's source was resized to 100000 x 512 at each call (gigabytes; past 2**31
    # Pillow's OverflowError), and validate passed.
    other = "width" if key == "height" else "height"
    for value in (100_000, 2**64, 4):
        call = {key: value, other: 512}
        with pytest.raises(ValidationError, match=rf"call\.{key}\s+.* 8 to 8192 pixels"):
            DiffusersOptions.model_validate({"preset": "instructp2p", "call": call})
        with pytest.raises(ValidationError, match=rf"call\.{key}\s"):
            DiffusersOptions.model_validate({"preset": "sd15", "call": {key: value}})
    options = {"preset": "instructp2p", "call": {key: 8192, other: 512}}
    assert DiffusersOptions.model_validate(options).spec().call[key] == 8192


def test_an_edit_pipeline_needs_both_sizes_or_none() -> None:
    # An edit pipeline draws at its source's size: a height alone was dropped, silently.
    for preset in ("instructp2p", "hqedit"):
        for size in ({"height": 256}, {"call": {"width": 256}}):
            with pytest.raises(ValidationError, match=r"without .*set both .*or source_size"):
                DiffusersOptions.model_validate({"preset": preset, **size})
    both = DiffusersOptions.model_validate({"preset": "instructp2p", "height": 256, "width": 320})
    assert both.spec().call["height"] == 256
    DiffusersOptions.model_validate({"preset": "sd15", "height": 256})  # text: its own width


def test_height_and_width_replace_an_edit_presets_source_size() -> None:
    # hqedit resizes sources to 512 x 512: its pictures stayed 512 x 512 whatever height and
    # width said, while the fingerprint recorded them.
    spec = DiffusersOptions.model_validate({"preset": "hqedit", "height": 32, "width": 48}).spec()
    assert spec.source_size is None
    assert (spec.call["width"], spec.call["height"]) == (48, 32)
    sized = {"preset": "hqedit", "call": {"height": 32, "width": 48}}
    assert DiffusersOptions.model_validate(sized).spec().source_size is None
    assert DiffusersOptions.model_validate({"preset": "hqedit"}).spec().source_size == (512, 512)
    # Both given, one would be ignored: refused.
    for sizes in ({"height": 32, "width": 48}, {"height": 32}, {"call": {"width": 48}}):
        with pytest.raises(ValidationError, match=r"source_size and .*both set the size"):
            DiffusersOptions.model_validate({"preset": "hqedit", "source_size": [64, 64], **sizes})
    # A reference picture's size and the picture's are two things.
    options = {"preset": "ip_adapter_sdxl", "source_size": [224, 224], "height": 512}
    spec = DiffusersOptions.model_validate(options).spec()
    assert spec.source_size == (224, 224) and spec.call["height"] == 512


def test_ip_adapter_inputs_need_the_ip_adapter_weights() -> None:
    # Without them, validate passed and every call failed ("'NoneType' object has no
    # attribute 'image_projection_layers'").
    generic = {"pipeline": "StableDiffusionXLPipeline", "checkpoint": "x", "inputs": "ip_adapter"}
    with pytest.raises(ValidationError, match=r"inputs 'ip_adapter' need .*options\.ip_adapter"):
        DiffusersOptions.model_validate(generic)
    weights = {"repo": "h94/IP-Adapter", "weight_name": "ip-adapter_sdxl.bin"}
    assert DiffusersOptions.model_validate({**generic, "ip_adapter": weights}).spec().ip_adapter
    assert DiffusersOptions.model_validate({"preset": "ip_adapter_sdxl"}).spec().ip_adapter


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        (":", "the module of 'module:Class' must be an absolute module path"),
        (":StableDiffusionPipeline", "the module of 'module:Class' must be an absolute"),
        (".x:Y", "the module of 'module:Class' must be an absolute module path"),
        ("a..b:Y", "the module of 'module:Class' must be an absolute module path"),
        ("os:", "the class of 'module:Class' must be a name"),
        ("os:a.b", "the class of 'module:Class' must be a name"),
    ],
)
def test_a_malformed_module_and_class_is_refused_naming_the_key(
    pipeline: str, message: str
) -> None:
    # importlib's ValueError ("Empty module name") reached the run as a fault of the
    # backend's code (exit 4); it is a config error naming options.pipeline.
    with pytest.raises(ValidationError, match=re.escape(message)) as caught:
        DiffusersOptions(pipeline=pipeline, checkpoint="org/model")
    assert [error["loc"] for error in caught.value.errors()] == [("pipeline",)]
    DiffusersOptions(pipeline="my.pipelines:MyPipeline", checkpoint="org/model")


def test_sequential_offload_on_a_cpu_is_refused() -> None:
    # It passed validate, then every call failed with a TypeError from torch.
    for devices in (["cpu"], ["cuda:0", "cpu"]):
        with pytest.raises(ValidationError, match=r"offload 'sequential' cannot run on .*'cpu"):
            DiffusersOptions(preset="sd15", offload="sequential", devices=devices)
    DiffusersOptions(preset="sd15", offload="model", devices=["cpu"])  # works there
    DiffusersOptions(preset="sd15", offload="sequential", devices=["cuda:0"])
    DiffusersOptions(preset="sd15", offload="sequential")  # cuda:0.. by default


@pytest.mark.parametrize(
    ("options", "taken", "why"),
    [
        ({"preset": "flux"}, ["return_dict"], "false returns a tuple, and every call fails"),
        ({"preset": "flux"}, ["num_images_per_prompt"], "one picture per prompt"),
        ({"preset": "flux"}, ["output_type", "prompt"], "samples' prompts"),
        ({"preset": "sd15"}, ["generator"], "seeded from the run's seed"),
        ({"preset": "sd15"}, ["callback_on_step_end"], "stops a call when the run stops"),
        ({"preset": "sd15"}, ["callback", "callback_steps"], "step callback"),
        ({"preset": "instructp2p"}, ["image"], "each sample's source image"),
        ({"preset": "sd15", "inputs": "edit"}, ["image"], "each sample's source image"),
        ({"preset": "blipdiffusion"}, ["reference_image"], "reference image and subject"),
        ({"preset": "ip_adapter_sdxl"}, ["ip_adapter_image"], "each sample's reference image"),
    ],
)
def test_call_arguments_the_engine_sets_itself_are_refused(
    options: dict[str, Any], taken: list[str], why: str
) -> None:
    # They passed validate, then were overwritten unread (prompt, output_type: still in the
    # fingerprint) or failed every call (return_dict = false, num_images_per_prompt = 2).
    call = dict.fromkeys(taken, 2)
    with pytest.raises(ValidationError) as caught:
        DiffusersOptions(**options, call={"max_sequence_length": 64, **call})
    [error] = caught.value.errors()
    assert error["loc"] == ("call",)
    message = str(error["msg"])
    assert f"call sets {', '.join(taken)}, which the engine sets itself" in message
    assert why in message and "remove" in message and "from options.call" in message


def test_a_call_argument_is_the_engines_only_where_it_passes_it() -> None:
    # A text pipeline's call takes no source picture from the engine: image is the user's.
    DiffusersOptions(preset="sd15", call={"image": "x", "max_sequence_length": 64})


def test_no_preset_calls_with_an_argument_the_engine_sets() -> None:
    from trig_stream.backends.generators.pipeline_calls import engine_arguments_problem

    for name, preset in PRESETS.items():
        assert engine_arguments_problem(preset.call, preset.inputs) is None, name


def test_validate_refuses_a_call_argument_the_engine_sets_as_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path) + '[[generators]]\nname = "g"\nbackend = "diffusers"\n'
        'options = { preset = "flux", call = { return_dict = false } }\n'
        '[[judges]]\nbackend = "fake"\n'
    )
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "run.toml:9: generators[0].options.call: call sets return_dict," in err


def test_load_arguments_win_over_the_typed_options(monkeypatch: pytest.MonkeyPatch) -> None:
    # The README says they win; they were passed to from_pretrained beside the typed ones:
    # "got multiple values for keyword argument".
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    spec = DiffusersOptions(
        preset="sd15",
        dtype="float32",
        local_files_only=True,
        revision="main",
        load={"dtype": "float16", "local_files_only": False, "revision": "fp16"},
    ).spec()
    assert spec.dtype_for("cpu") == spec.dtype_for("cuda:0") == "float16"
    assert spec.local_files_only is False
    assert spec.load == {
        "safety_checker": None,
        "requires_safety_checker": False,
        "revision": "fp16",
    }
    assert (
        DiffusersOptions(preset="sd15", load={"torch_dtype": "bfloat16"}).spec().dtype == "bfloat16"
    )
    for load, message in (
        ({"dtype": "float8"}, r"load\.dtype 'float8' is no dtype; use one of 'float32'"),
        ({"dtype": "float16", "torch_dtype": "float16"}, "both dtype and torch_dtype"),
        ({"local_files_only": "yes"}, r"load\.local_files_only 'yes' is no boolean"),
    ):
        with pytest.raises(ValidationError, match=message):
            DiffusersOptions(preset="sd15", load=load)


def test_hub_offline_forces_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert DiffusersOptions(preset="sdxl").spec().local_files_only is False
    assert DiffusersOptions(preset="sdxl", local_files_only=True).spec().local_files_only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert DiffusersOptions(preset="sdxl").spec().local_files_only is True


def test_backends_are_registered() -> None:
    names = backend_names("generators")
    assert {"diffusers", "image_folder", "openai_images", "dtm_rewrite"} <= set(names)


def test_workers_follow_devices_and_conflicts_are_refused(make_config: ConfigFactory) -> None:
    pytest.importorskip("diffusers")
    entry = {"name": "g", "backend": "diffusers"}
    config = make_config(
        generators=[{**entry, "options": {"preset": "flux", "devices": ["cuda:0", "cuda:1"]}}]
    )
    generator = build_generator(config.generators[0], config)
    assert isinstance(generator, DiffusersGenerator)
    # Two calls per device: one running, the next waiting at it.
    assert generator.devices == ["cuda:0", "cuda:1"] and generator.workers == 4
    config = make_config(generators=[{**entry, "workers": 3, "options": {"preset": "flux"}}])
    generator = build_generator(config.generators[0], config)
    assert isinstance(generator, DiffusersGenerator)
    assert generator.devices == ["cuda:0", "cuda:1", "cuda:2"] and generator.workers == 6
    config = make_config(
        generators=[{**entry, "workers": 3, "options": {"preset": "flux", "devices": ["cpu"]}}]
    )
    with pytest.raises(ConfigError, match="workers = 3 but 1 devices"):
        build_generator(config.generators[0], config)
    config = make_config(generators=[{**entry, "options": {"preset": "hqedit"}}])
    with pytest.raises(ConfigError, match="p2p task but the run is t2i"):
        build_generator(config.generators[0], config)


def test_another_device_of_a_dtype_in_use_keeps_the_fingerprint(
    make_config: ConfigFactory,
) -> None:
    # Resuming a one-CPU run on two CPUs was refused: `dtype ["float32"] in the run dir,
    # ["float32", "float32"] in the config`.
    pytest.importorskip("diffusers")

    def fingerprint(*devices: str) -> dict[str, Any]:
        options = {"preset": "flux", "devices": list(devices)}
        config = make_config(generators=[{"name": "g", "backend": "diffusers", "options": options}])
        return build_generator(config.generators[0], config).fingerprint()

    def manifest(fingerprint: dict[str, Any]) -> Manifest:
        written = Manifest(run_name="r", task="t2i", generators={"g": fingerprint})
        return Manifest.model_validate_json(written.model_dump_json())

    one = fingerprint("cpu")
    assert one == fingerprint("cpu", "cpu") and one["dtype"] == ["float32"]
    assert manifest(one).differences(manifest(fingerprint("cpu", "cpu"))) == []
    # A run directory written with one dtype per device resumes on any number of them.
    older = manifest({**one, "dtype": ["float32", "float32"]})
    assert older.differences(manifest(one)) == []
    assert older.differences(manifest(fingerprint("cpu", "cpu", "cpu"))) == []
    # A device that draws in another dtype is a change.
    mixed = fingerprint("cpu", "cuda:0")
    assert mixed["dtype"] == ["bfloat16", "float32"]
    assert older.differences(manifest(mixed)) == [
        'generator \'g\': dtype ["float32"] in the run dir, ["bfloat16", "float32"] in the config'
    ]


def test_a_fingerprint_without_explicit_options_is_as_before() -> None:
    # Run directories made before a call argument set to the pipeline's default compared
    # equal to one left out must resume with their config unchanged: that equality is the
    # comparison's (Generator.fingerprint_defaults), and the fingerprints stay as they were.
    def fingerprint(**options: Any) -> dict[str, Any]:
        generator = DiffusersGenerator("g", DiffusersOptions.model_validate(options))
        return generator.fingerprint()

    assert fingerprint(preset="flux", devices=["cpu"]) == {
        "backend": "diffusers",
        "preset": "flux",
        "pipeline": "FluxPipeline",
        "checkpoint": "black-forest-labs/FLUX.1-dev",
        "revision": None,
        "variant": None,
        "inputs": "text",
        "dtype": ["float32"],
        "scheduler": None,
        "call": {"guidance_scale": 3.5, "height": 1024, "num_inference_steps": 50, "width": 1024},
        "ip_adapter": None,
        "source_size": None,
    }
    tiny = fingerprint(
        pipeline="FluxPipeline",
        checkpoint="/models/tiny-flux",
        devices=["cpu"],
        steps=2,
        height=64,
        width=64,
        call={"max_sequence_length": 64},
    )
    assert tiny["call"] == {
        "height": 64,
        "max_sequence_length": 64,
        "num_inference_steps": 2,
        "width": 64,
    }
    assert (tiny["preset"], tiny["checkpoint"]) == (None, "/models/tiny-flux")
    # A preset's own value set explicitly was always the same fingerprint.
    assert fingerprint(preset="flux", devices=["cpu"], steps=50) == fingerprint(
        preset="flux", devices=["cpu"]
    )


def test_missing_extra_names_the_install(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "diffusers" else real(name, *args),
    )
    config = make_config(generators=[{"name": "g", "backend": "diffusers", "options": {
        "preset": "flux"}}])  # fmt: skip
    with pytest.raises(MissingExtraError, match=r"pip install 'trig-stream\[diffusers\]'"):
        build_generator(config.generators[0], config)


def test_missing_torch_is_named_before_diffusers_is_imported(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With diffusers but no torch, diffusers exports placeholder classes: the check called
    # FluxPipeline "not a diffusers pipeline; check options.pipeline".
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: import fails
    config = make_config(generators=[{"name": "g", "backend": "diffusers", "options": {
        "preset": "flux"}}])  # fmt: skip
    with pytest.raises(
        MissingExtraError,
        match=r"^torch is not installed; .*pip install 'trig-stream\[diffusers\]'",
    ):
        build_generator(config.generators[0], config)


def test_generator_modules_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import trig_stream.backends.generators.diffusers_generator\n"
        "import trig_stream.backends.generators.image_folder\n"
        "import trig_stream.backends.generators.openai_images\n"
        "import trig_stream.backends.generators.dtm_rewrite\n"
        "import trig_stream.testing.tiny_pipelines\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'openai'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
