"""Old and Rubin spellings of config keys: accepted everywhere, mapped to the current keys, listed by config show.

``tests/data/config/apfast_old_layout.toml`` is what ``apfast config show`` printed before the differencing
sections were nested under ``difference`` (``[diffim]``, ``[decorrelation]``) and DIA detection under
``dia.detection`` (``dia.threshold``, ``dia.grow_footprint``), and while it had the ``ingest``, ``calibs``
and ``refcat`` sections (removed: they never had an effect), with the settings of ``OLD_LAYOUT_SETTINGS``
(the command is in ``tests/data/README.md``): the config an existing rerun stores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from apfast.errors import ConfigError
from apfast.repo.repository import CONFIG_RELPATH, write_config
from apfast.run.cli import main
from apfast.run.config import (
    LEGACY_VALUES,
    MOVED_KEYS,
    REMOVED_KEYS,
    RUBIN_KEYS,
    PipelineConfig,
    apply_overrides,
    canonical_key,
    comparable_settings,
    config_fields,
    config_sha256,
    config_to_toml,
    load_config,
)

OLD_LAYOUT = Path(__file__).parents[1] / "data" / "config" / "apfast_old_layout.toml"

#: The settings of the old-layout file, spelled with the current keys.
OLD_LAYOUT_SETTINGS = [
    "difference.psfmatch.kernel_size=25",
    "difference.psfmatch.spatial_kernel_order=2",
    "difference.decorrelation.kernel_size=31",
    "difference.decorrelation.variance_scaling=predicted",
    "dia.detection.threshold=5.5",
    "dia.detection.grow_merge=3",
    "characterize.detection.threshold=6.0",
    "apdb.isolation_level=READ_UNCOMMITTED",
]
#: The file also sets calibs.validity_days = 999, a removed key: ignored there (with a warning).


def test_every_alias_maps_to_a_current_key() -> None:
    keys = set(config_fields())
    sections = {k.rsplit(".", 1)[0] + "." for k in keys if "." in k}
    for old, new in {**RUBIN_KEYS, **MOVED_KEYS}.items():
        assert (new in sections) if old.endswith(".") else (new in keys), old
        assert canonical_key(old.rstrip(".")) == new.rstrip(".")
    assert canonical_key("diffim.kernel_size") == "difference.psfmatch.kernel_size"
    assert canonical_key("decorrelation.fft_planner") == "difference.decorrelation.fft_planner"
    assert canonical_key("difference.psfmatch.kernel_size") == "difference.psfmatch.kernel_size"


def test_old_spellings_set_the_new_keys_in_overrides_files_and_mappings(tmp_path: Path) -> None:
    new = load_config(overrides=["difference.psfmatch.kernel_size=25", "difference.decorrelation.kernel_size=31"])
    assert new.difference.psfmatch.kernel_size == 25 and new.difference.decorrelation.kernel_size == 31
    assert load_config(overrides=["diffim.kernel_size=25", "decorrelation.kernel_size=31"]) == new
    f = tmp_path / "old.toml"
    f.write_text("[diffim]\nkernel_size = 25\n\n[decorrelation]\nkernel_size = 31\n", encoding="utf-8")
    assert load_config([f]) == new
    g = tmp_path / "dotted.toml"
    g.write_text("diffim.kernel_size = 25\ndecorrelation.kernel_size = 31\n", encoding="utf-8")
    assert load_config([g]) == new
    assert apply_overrides(load_config(), {"diffim": {"kernel_size": 25}, "decorrelation.kernel_size": 31}) == new
    # later settings win whichever spelling each uses
    assert load_config(overrides=["diffim.kernel_size=23", "difference.psfmatch.kernel_size=25",
                                  "decorrelation.kernel_size=31"]) == new


def test_rubin_spellings_work_in_files_too(tmp_path: Path) -> None:
    f = tmp_path / "rubin.toml"
    f.write_text('[diaPipe.apdb]\ndb_url = "sqlite:///r.db"\nisolation_level = "READ_UNCOMMITTED"\n',
                 encoding="utf-8")
    cfg = load_config([f])
    assert (cfg.apdb.db_url, cfg.apdb.isolation_level) == ("sqlite:///r.db", "READ_UNCOMMITTED")


def test_errors_under_an_old_spelling_name_the_new_key_and_what_was_typed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["diffim.kernel_size_min=20"])
    msg = str(info.value)
    assert "'difference.psfmatch.kernel_size_min' = 20 is invalid" in msg
    assert "(from -c diffim.kernel_size_min=20)" in msg
    with pytest.raises(ConfigError, match=r"did you mean 'difference\.psfmatch\.kernel_size'"):
        load_config(overrides=["diffim.kernel_sise=21"])


def test_config_show_lists_the_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "# Aliases:" in out
    assert "#   diffim.* -> difference.psfmatch.*" in out
    assert "#   decorrelation.* -> difference.decorrelation.*" in out
    assert "#   dia.threshold -> dia.detection.threshold" in out
    assert "#   dia.grow_footprint -> dia.detection.grow_merge" in out
    assert "#   -c diaPipe.apdb.db_url=... -> apdb.db_url" in out
    assert "#   -C .../config/calexpTemplates.py -> the built-in calexpTemplates.toml" in out
    assert "[difference.psfmatch]" in out and "[difference.decorrelation]" in out
    assert "\n[diffim]" not in out and "\n[decorrelation]" not in out


def test_a_config_stored_in_the_old_layout_loads_and_equals_the_new_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="apfast.run.config"):
        old = load_config([OLD_LAYOUT])
    # the removed keys at their old defaults pass silently; the one the file changed is named
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "ignoring config key 'calibs.validity_days' = 999.0" in warned[0]
    assert "use `apfast ingest-calibs --validity DAYS`" in warned[0]
    new = load_config(overrides=OLD_LAYOUT_SETTINGS)
    assert old == new
    assert config_sha256(old) == config_sha256(new)
    assert old.difference.psfmatch.kernel_size == 25 and old.difference.decorrelation.variance_scaling == "predicted"
    assert (old.dia.detection.threshold, old.dia.detection.grow_merge, old.dia.detection.polarity) == (5.5, 3, "both")


def test_a_rerun_with_an_old_layout_config_accepts_the_same_settings(tmp_path: Path) -> None:
    out = tmp_path / "rerun"
    stored = out / CONFIG_RELPATH
    stored.parent.mkdir(parents=True)
    stored.write_text(OLD_LAYOUT.read_text(encoding="utf-8"), encoding="utf-8")
    # features added since default on; a config from before them means them off (LEGACY_VALUES)
    with pytest.raises(ConfigError, match=r"amp_offset\.do_correct false -> true; .*dia_filter\.do_filter false "
                                          r"-> true; .*reliability\.model \"none\" -> \"gbt-1\""):
        write_config(out, config_to_toml(load_config(overrides=OLD_LAYOUT_SETTINGS)), normalize=comparable_settings)
    old_settings = [*OLD_LAYOUT_SETTINGS, *(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                            for k, v in LEGACY_VALUES.items())]
    same = config_to_toml(load_config(overrides=old_settings))
    write_config(out, same, normalize=comparable_settings)  # equal under the new keys: no --clobber-config
    assert stored.read_text(encoding="utf-8") == same  # and the stored config now uses the new layout
    stored.write_text(OLD_LAYOUT.read_text(encoding="utf-8"), encoding="utf-8")
    changed = config_to_toml(load_config(overrides=[*old_settings, "diffim.kernel_size=27"]))
    with pytest.raises(ConfigError, match=r"difference\.psfmatch\.kernel_size 25 -> 27; pass --clobber-config"):
        write_config(out, changed, normalize=comparable_settings)
    # keys new in dia.detection compare as their defaults (what the old version did); others count
    changed = config_to_toml(load_config(overrides=[*old_settings, "dia.detection.n_sigma_to_grow=3"]))
    with pytest.raises(ConfigError, match=r"dia\.detection\.n_sigma_to_grow 2\.4 -> 3\.0; pass --clobber-config"):
        write_config(out, changed, normalize=comparable_settings)


@pytest.mark.parametrize(("override", "instead"), [
    ("ingest.mode=copy", "use `apfast ingest --mode` (or `apfast ingest-calibs --mode`)"),
    ("ingest.camera=DECam", "use `apfast ingest --camera` (the camera of a new repository)"),
    ("calibs.validity_days=999", "use `apfast ingest-calibs --validity DAYS`"),
    ("refcat.astrometry=gaia", "use calibrate.astrometry_refcat"),
    ("refcat.photometry=ps1", "use calibrate.photometry_refcat"),
    ("refcat.nside=64", "use `apfast ingest-refcat --nside N`"),
])
def test_a_removed_key_on_the_command_line_is_one_line_naming_what_replaced_it(
        override: str, instead: str, capsys: pytest.CaptureFixture[str]) -> None:
    key = override.split("=")[0]
    assert key in REMOVED_KEYS and key not in config_fields()
    assert main(["config", "show", "-c", override]) == 2
    err = capsys.readouterr().err
    assert err == (f"apfast config: error: config key '{key}' was removed (it never had an effect); {instead} "
                   f"(from -c {override})\n")
    with pytest.raises(ConfigError, match="was removed"):
        apply_overrides(PipelineConfig(), {key: 1})  # code gets the error too


def test_removed_sections_in_a_file_are_ignored(tmp_path: Path) -> None:
    f = tmp_path / "old.toml"
    f.write_text('[ingest]\nmode = "link"\ncamera = "DECam"\n[refcat]\nnside = 32\n[process]\nn_threads = 2\n',
                 encoding="utf-8")
    assert load_config([f]) == load_config(overrides=["process.n_threads=2"])
