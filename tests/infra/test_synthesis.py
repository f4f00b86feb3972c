"""The synth cache (stacks/synthesis.py) never serves a stale or different app.

A hit must be what a fresh synth would write, byte for byte, and any input of the template
must change the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmq.config import LlmqConfig
from stacks import synthesis
from stacks.context import CONTEXT_ALLOW_PLACEHOLDER_DEPS_LAYER, CONTEXT_SANDBOX
from stacks.synthesis import SYNTH_CACHE_ENV, RunValues, synth_key, synthesize

SANDBOX = {CONTEXT_SANDBOX: True}


def _config(provider_url: str) -> LlmqConfig:
    return LlmqConfig.model_validate({"provider": {"base_url": provider_url}})


def _asset_files(directory: Path) -> dict[str, bytes]:
    """The staged assets (function and layer code), by path."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.glob("asset.*/**/*"))
        if path.is_file()
    }


def test_a_hit_for_another_runs_provider_url_is_the_fresh_synth_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = "http://127.0.0.1:41001/v1", "http://127.0.0.1:41002/v1"
    # Given a cache that holds the sandbox app synthesized with one run's provider URL
    monkeypatch.setenv(SYNTH_CACHE_ENV, str(tmp_path / "cache"))
    synthesize(_config(first), SANDBOX, tmp_path / "first", run_values={"provider": first})
    # When another run asks for it with its own URL
    hit = synthesize(_config(second), SANDBOX, tmp_path / "hit", run_values={"provider": second})
    # Then it came from the cache (one entry)
    assert len([entry for entry in (tmp_path / "cache").iterdir() if entry.is_dir()]) == 1
    # And its template is a synth's without the cache, byte for byte, and so are the assets
    monkeypatch.delenv(SYNTH_CACHE_ENV)
    fresh = synthesize(_config(second), SANDBOX, tmp_path / "fresh")
    assert hit.template_path.read_bytes() == fresh.template_path.read_bytes()
    assert _asset_files(hit.directory) == _asset_files(fresh.directory)
    # And every asset the manifest publishes is where it says (it names the template by the
    # hash it was stored under, which only labels the upload)
    manifest = json.loads(hit.assets_manifest.read_text())
    for asset in manifest["files"].values():
        assert (hit.directory / asset["source"]["path"]).exists(), asset["source"]["path"]


def test_every_input_of_the_template_changes_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a copy of the sources the key reads
    for name in synthesis.SOURCE_FILES:
        shutil.copy(synthesis.ROOT / name, tmp_path / name)
    for tree in synthesis.SOURCE_TREES:
        shutil.copytree(synthesis.ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(synthesis, "ROOT", tmp_path)
    config = LlmqConfig()
    key = synth_key(config, SANDBOX)
    # Then the config, the context and each source tree are part of it
    assert synth_key(LlmqConfig(max_attempts=config.max_attempts + 1), SANDBOX) != key
    assert synth_key(config, {}) != key
    assert synth_key(config, {**SANDBOX, "llmq:log_level": "DEBUG"}) != key
    # (an assembly made with the tests' placeholder layer is never served to a real synth)
    assert synth_key(config, {CONTEXT_ALLOW_PLACEHOLDER_DEPS_LAYER: True}) != synth_key(config, {})
    for tree in synthesis.SOURCE_TREES:
        source = next(path for path in sorted((tmp_path / tree).rglob("*.py")))
        original = source.read_text()
        source.write_text(original + "\n# changed\n")
        assert synth_key(config, SANDBOX) != key, tree
        source.write_text(original)
    assert synth_key(config, SANDBOX) == key
    # And a run's own values only through their placeholder
    url = "http://127.0.0.1:41003/v1"
    other = "http://127.0.0.1:41004/v1"
    assert synth_key(_config(url), SANDBOX, RunValues({"provider": url})) == synth_key(
        _config(other), SANDBOX, RunValues({"provider": other})
    )
    assert synth_key(_config(url), SANDBOX) != synth_key(_config(other), SANDBOX)


def test_a_damaged_entry_is_synthesized_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a cached assembly whose template was changed on disk
    monkeypatch.setenv(SYNTH_CACHE_ENV, str(tmp_path / "cache"))
    stored = synthesize(LlmqConfig(), SANDBOX, tmp_path / "first")
    (entry,) = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    cached_template = entry / "assembly" / stored.template_file
    cached_template.write_text(cached_template.read_text().replace("llmq", "LLMQ"))
    # When the same app is asked for, Then it is synthesized again, as it should be
    again = synthesize(LlmqConfig(), SANDBOX, tmp_path / "again")
    assert again.template_path.read_bytes() == stored.template_path.read_bytes()
