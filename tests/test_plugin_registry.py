"""A design plug-in registers itself: T5's (``generator.t5``) adds its backbone and its own decoder to the decoder
registry when ``generator.designs.registry`` (the one module that imports it) is loaded, and a second registration,
or one naming decoders nobody registered, is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from generator.decoding import registry
from generator.designs import registry as designs
from generator.t5.decoders import T5

ROOT = Path(__file__).resolve().parents[1]


def test_the_t5_plugin_registers_its_design_backbone_and_decoders() -> None:
    assert T5 in designs.DESIGNS and T5 in registry.BACKBONES
    assert registry.names_for(T5) == ("beam", "dense", "hybrid", "cold-beam", "generate")
    assert registry.SPECS["generate"].backbones == (T5,) and T5 not in registry.SPECS["exact"].backbones
    assert "generate" in designs.decoder_names() and "generate:" in designs.decoder_help()
    assert registry.with_hybrid() == ("causal", T5) and registry.resolve(T5, "auto") == "beam"


def test_the_decoder_registry_alone_knows_the_built_in_backbones_only() -> None:
    code = ("import sys; from generator.decoding import registry as r; "
            "print(sorted(r.BACKBONES), 'generate' in r.names(), any(m.startswith('generator.t5') for m in sys.modules)); "
            "import generator.designs.registry as d; print(sorted(r.BACKBONES), 'generate' in d.decoder_names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}).stdout
    assert out.splitlines() == ["['causal', 'title'] False False", "['causal', 't5', 'title'] True"]


def test_register_refuses_a_second_registration_and_unknown_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))  # the real tables are left as they were
    monkeypatch.setattr(registry, "SPECS", dict(registry.SPECS))
    entry = registry.BACKBONES[T5]
    with pytest.raises(ValueError, match="backbone 't5' is registered already"):
        registry.register(T5, entry, serves=("beam",))
    with pytest.raises(ValueError, match=r"backbone 'other' serves unregistered decoders \['greedy'\]"):
        registry.register("other", entry, serves=("greedy",))
    with pytest.raises(ValueError, match="decoder 'beam' is registered already"):
        registry.register("other", entry, serves=(), specs=(registry.SPECS["beam"]._replace(backbones=("other",)),))
    assert "other" not in registry.BACKBONES and "other" not in registry.SPECS["beam"].backbones  # nothing half-done
    registry.register("other", entry, serves=("beam",))
    assert registry.resolve("other", "auto") == "beam" and registry.SPECS["beam"].backbones[-1] == "other"
    with pytest.raises(ValueError, match=r"decoder 'exact' is for causal runs; this other run has \['auto', 'beam'\]"):
        registry.resolve("other", "exact")
