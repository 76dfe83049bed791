"""Tests of apfast.run.config: defaults, overrides, files, errors, TOML round trips, digests."""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apfast.errors import ConfigError
from apfast.run import config as cfgmod
from apfast.run.config import (
    ApdbConfig,
    PipelineConfig,
    apply_overrides,
    config_fields,
    config_sha256,
    config_to_toml,
    load_config,
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------ structure and defaults


def test_defaults_match_the_brief() -> None:
    cfg = PipelineConfig()
    # the ingest, calibs and refcat sections of the brief were removed: they never had an effect
    # (the ingest commands take flags; the refcat names are calibrate's), see test_config_aliases.py
    assert (cfg.calibrate.astrometry_refcat, cfg.calibrate.photometry_refcat) == ("gaia", "ps1")
    assert cfg.apdb.db_url == "sqlite:///apdb/association.db"
    assert cfg.apdb.isolation_level == "READ_COMMITTED"
    assert cfg.apdb.connection_timeout == 60.0 and isinstance(cfg.apdb.connection_timeout, float)
    assert cfg.apdb.connection_pool is True
    assert (cfg.process.n_threads, cfg.process.doraise, cfg.process.clobber_output) == (0, False, False)


def _section_classes() -> list[type]:
    out, todo = [], [PipelineConfig]
    while todo:
        cls = todo.pop()
        out.append(cls)
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                todo.append(tp)
    return out


@pytest.mark.parametrize("cls", _section_classes(), ids=lambda c: c.__name__)
def test_every_section_is_frozen_slotted_kwonly_and_documented(cls: type) -> None:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen
    assert "__slots__" in cls.__dict__
    assert cls.__doc__ and cls.__doc__.strip()
    with pytest.raises(TypeError):
        cls(1)  # keyword-only
    inst = cls()
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(inst, first, getattr(inst, first))
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name} has no doc"
        tp = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(tp) is typing.Literal:
            assert set(f.metadata["choices"]) == set(typing.get_args(tp)), f"{f.name}: a doc line per choice"


def test_config_fields_lists_every_leaf_with_type_default_doc() -> None:
    fields = config_fields()
    assert list(fields)[:2] == ["apdb.db_url", "apdb.isolation_level"]
    assert set(fields) >= {"difference.decorrelation.kernel_size", "dia.detection.grow_merge",
                           "apdb.connection_pool", "process.doraise"}
    assert all("." in k for k in fields)
    info = fields["difference.decorrelation.kernel_size"]
    assert info.type == (int | None) and info.default is None and "none: the smallest odd side" in info.doc
    typ, default, doc = fields["dia.detection.grow_merge"]
    assert (typ, default) == (int, 2) and doc
    # every leaf default equals the default config's value
    cfg = PipelineConfig()
    for key, (_, default, _) in fields.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        assert value == default, key
    assert set(config_fields(ApdbConfig)) == {
        "db_url",
        "isolation_level",
        "connection_timeout",
        "connection_pool",
    }


# ------------------------------------------------------------------ overrides


def test_rubin_style_unquoted_overrides() -> None:
    cfg = load_config(
        overrides=[
            "apdb.isolation_level=READ_UNCOMMITTED",
            "apdb.db_url=sqlite:///apdb/association.db",
            "dia.detection.threshold=6",
            "apdb.connection_pool=false",
            'calibrate.astrometry_refcat="my cat"',
            "process.n_threads = 8",
        ]
    )
    assert cfg.apdb.isolation_level == "READ_UNCOMMITTED"
    assert cfg.apdb.db_url == "sqlite:///apdb/association.db"
    assert cfg.dia.detection.threshold == 6.0 and isinstance(cfg.dia.detection.threshold, float)
    assert cfg.apdb.connection_pool is False
    assert cfg.calibrate.astrometry_refcat == "my cat"
    assert cfg.process.n_threads == 8


def test_later_settings_win_and_none_text_unsets(tmp_path: Path) -> None:
    f1 = _write(tmp_path, "a.toml", "[process]\nn_threads = 2\n[difference.decorrelation]\nkernel_size = 5\n")
    f2 = _write(tmp_path, "b.toml", "process.n_threads = 3\n")
    cfg = load_config([f1, f2])
    assert cfg.process.n_threads == 3 and cfg.difference.decorrelation.kernel_size == 5
    cfg = load_config([f1, f2], ["process.n_threads=4", "process.n_threads=5",
                                 "difference.decorrelation.kernel_size=none"])
    assert cfg.process.n_threads == 5 and cfg.difference.decorrelation.kernel_size is None
    assert (
        load_config(
            [_write(tmp_path, "c.toml", '[difference.decorrelation]\nkernel_size = "none"\n')],
            base=apply_overrides(PipelineConfig(), {"difference.decorrelation.kernel_size": 3}),
        ).difference.decorrelation.kernel_size
        is None
    )


def test_base_is_kept_and_not_modified() -> None:
    base = load_config(overrides=["process.doraise=true"])
    cfg = load_config(overrides=["process.n_threads=2"], base=base)
    assert cfg.process.doraise is True and cfg.process.n_threads == 2
    assert base.process.n_threads == 0


def test_apply_overrides_mapping_forms_and_returns_new_object() -> None:
    cfg = PipelineConfig()
    a = apply_overrides(cfg, {"apdb.connection_timeout": 5, "process.clobber_output": True})
    b = apply_overrides(cfg, {"apdb": {"connection_timeout": 5.0}, "process": {"clobber_output": True}})
    assert a == b and a is not cfg
    assert a.apdb.connection_timeout == 5.0 and isinstance(a.apdb.connection_timeout, float)
    assert cfg == PipelineConfig()  # untouched
    assert apply_overrides(cfg, []) == cfg
    unset = apply_overrides(cfg, {"difference.decorrelation.kernel_size": None})
    assert unset.difference.decorrelation.kernel_size is None


def test_equal_configs_compare_and_hash_equal() -> None:
    a = load_config(overrides=["apdb.connection_timeout=30"])
    b = apply_overrides(PipelineConfig(), {"apdb.connection_timeout": 30.0})
    assert a == b and hash(a) == hash(b)
    assert a != PipelineConfig()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("apdb.db_ur=x", "unknown config key 'apdb.db_ur'; did you mean 'apdb.db_url'?"),
        ("apdb.isolation_levl=SERIALIZABLE", "did you mean 'apdb.isolation_level'"),
        ("db_url=x", "unknown config key 'db_url'; did you mean 'apdb.db_url'?"),
        ("apbd.db_url=x", "unknown config key 'apbd.db_url'; did you mean 'apdb.db_url'?"),
        ("zzz.qqq=1", "unknown config key 'zzz.qqq'"),
        ("apdb.db_url.x=1", "unknown config key 'apdb.db_url.x'"),
    ],
)
def test_unknown_keys_suggest_close_matches(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=_re(expected)) as info:
        load_config(overrides=[override])
    assert f"-c {override}" in str(info.value)
    assert info.value.exit_code == 2


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_unknown_key_without_close_match_lists_sections() -> None:
    with pytest.raises(ConfigError, match="sections apdb, process, output, isr"):
        load_config(overrides=["zzz.qqq=1"])


@pytest.mark.parametrize("override", ["apdb.db_url", "=3", "apdb..db_url=3", ".x=1", ""])
def test_malformed_override_names_the_expected_form(override: str) -> None:
    with pytest.raises(ConfigError, match=r"malformed config override .* expected KEY=VALUE"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("process.n_threads=1.5", "'process.n_threads' = 1.5 has the wrong type: expected an integer"),
        ("process.n_threads=true", "'process.n_threads' = True has the wrong type: expected an integer"),
        ("process.doraise=1", "'process.doraise' = 1 has the wrong type: expected true or false"),
        ("process.doraise=yes", "is not a valid TOML value for 'process.doraise' (expected true or false)"),
        ("difference.decorrelation.kernel_size=true", "expected an integer or none"),
        ("apdb.connection_timeout=abc", "e.g. -c apdb.connection_timeout=2.5"),
        (
            "apdb.isolation_level=READ",
            "'apdb.isolation_level' = 'READ' is not allowed: expected one of "
            "'READ_COMMITTED', 'READ_UNCOMMITTED', 'REPEATABLE_READ', 'SERIALIZABLE'",
        ),
        ("difference.template_source=symlink", "expected one of 'coadd', 'calexp'"),
        ("apdb.connection_timeout=-1", "'apdb.connection_timeout' = -1.0 is invalid: use a finite number"),
        ("apdb.connection_timeout=0", "> 0"),
        ("apdb.connection_timeout=inf", "finite"),
        ("apdb.connection_timeout=nan", "finite"),
        ("difference.decorrelation.kernel_size=-1", "'difference.decorrelation.kernel_size' = -1 is invalid"),
        ("difference.decorrelation.kernel_size=4", "use a positive odd integer"),
        ("dia.detection.grow_merge=-1", "dia.detection.grow_merge = -1 is invalid; it must be an integer >= 0"),
        ("refcat.nside=64", "config key 'refcat.nside' was removed (it never had an effect); "
                            "use `apfast ingest-refcat --nside N` (from -c refcat.nside=64)"),
        ("process.n_threads=-2", "'process.n_threads' = -2 is invalid: use 0 for all cores"),
        ("apdb.db_url=association.db", "SQLAlchemy URL"),
        ("ingest.camera=", "use `apfast ingest --camera`"),
        ("apdb=3", "'apdb' is a section, not a value"),
        ("apdb.connection_timeout=1\nprocess.n_threads=3", "not a valid TOML value"),
        (
            "apdb.connection_timeout={a=1}",
            "'apdb.connection_timeout' is a value (a number (float)), not a table",
        ),
        ("apdb.connection_timeout=[1]", "'apdb.connection_timeout' = [1] has the wrong type"),
    ],
)
def test_bad_values_name_key_value_and_fix(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=_re(expected)):
        load_config(overrides=[override])


def test_range_error_names_the_setting_that_caused_it(tmp_path: Path) -> None:
    f = _write(tmp_path, "bad.toml", "[difference.decorrelation]\nkernel_size = 12\n")
    with pytest.raises(ConfigError, match=_re(f"(in file {f})")):
        load_config([f])


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"'apdb\.connection_timeout' = 0\.0 is invalid"):
        ApdbConfig(connection_timeout=0)
    with pytest.raises(ConfigError, match=r"'apdb\.connection_pool' = 'yes' has the wrong type"):
        ApdbConfig(connection_pool="yes")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"'apdb' = \{\} has the wrong type: expected a table of ApdbConfig"
    ):
        PipelineConfig(apdb={})  # type: ignore[arg-type]


def test_apply_overrides_rejects_a_bare_string_and_a_non_config() -> None:
    with pytest.raises(ConfigError, match="list of 'key=value' strings"):
        apply_overrides(PipelineConfig(), "process.n_threads=2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected a PipelineConfig"):
        apply_overrides(ApdbConfig(), ["process.n_threads=2"])  # type: ignore[arg-type]


def test_one_bad_setting_applies_nothing() -> None:
    base = PipelineConfig()
    with pytest.raises(ConfigError):
        apply_overrides(base, ["process.n_threads=2", "difference.decorrelation.kernel_size=4"])
    assert base == PipelineConfig()


# ------------------------------------------------------------------ files


def test_toml_file_errors_name_file_and_line(tmp_path: Path) -> None:
    f = _write(tmp_path, "broken.toml", "[apdb]\ndb_url = 'sqlite:///x'\nconnection_timeout = = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml.*not valid TOML.*line 3"):
        load_config([f])
    with pytest.raises(ConfigError, match=r"does not exist; check the -C path"):
        load_config([tmp_path / "missing.toml"])
    g = _write(tmp_path, "unknown.toml", "[apdb]\ndb_ur = 'sqlite:///x'\n")
    with pytest.raises(
        ConfigError, match=_re(f"unknown config key 'apdb.db_ur'; did you mean 'apdb.db_url'? (in file {g})")
    ):
        load_config([g])
    h = _write(tmp_path, "deep.toml", "[apdb.db_url]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"'apdb\.db_url' is a value \(a string\), not a table"):
        load_config([h])
    k = _write(tmp_path, "top.toml", "mode = 'copy'\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'mode'; did you mean 'difference\.psfmatch\.mode'"):
        load_config([k])


def test_toml_file_accepts_nested_and_dotted_forms(tmp_path: Path) -> None:
    f = _write(
        tmp_path,
        "run.toml",
        "difference.template_source = 'calexp'\n[apdb]\nisolation_level = 'SERIALIZABLE'\nconnection_timeout = 2\n",
    )
    cfg = load_config(str(f))  # a single path is accepted too
    assert cfg.difference.template_source == "calexp" and cfg.apdb.isolation_level == "SERIALIZABLE"
    assert cfg.apdb.connection_timeout == 2.0


# ------------------------------------------------------------------ output, round trip, digest


def test_toml_output_documents_every_key_and_loads_back(tmp_path: Path) -> None:
    cfg = load_config(overrides=["apdb.isolation_level=SERIALIZABLE", "difference.decorrelation.kernel_size=5"])
    text = config_to_toml(cfg)
    data = tomllib.loads(text)
    for key, info in config_fields().items():
        *secs, name = key.split(".")
        if functools.reduce(getattr, key.split("."), cfg) is None:
            assert f"# {name} = (unset: none)" in text  # TOML has no null: unset keys are comments
            continue
        assert name in functools.reduce(lambda d, k: d[k], secs, data), key
        # the doc sits in a comment above the key
        assert f"# {info.doc}" in text
    lines = text.splitlines()
    i = lines.index('isolation_level = "SERIALIZABLE"')
    assert lines[i - 5] == "# Transaction isolation level of APDB connections."
    assert any(line.startswith('#   "READ_UNCOMMITTED": ') for line in lines)
    p = _write(tmp_path, "out.toml", text)
    assert load_config([p]) == cfg


def test_none_round_trips_as_comment_or_none_string(tmp_path: Path) -> None:
    cfg = PipelineConfig()
    text = config_to_toml(cfg)
    assert "kernel_size" not in tomllib.loads(text)["difference"]["decorrelation"]
    assert "# kernel_size = (unset: none)" in text
    assert load_config([_write(tmp_path, "a.toml", text)]) == cfg
    base = apply_overrides(PipelineConfig(), {"difference.decorrelation.kernel_size": 7})
    text2 = config_to_toml(base)
    assert "kernel_size = 7" in text2
    assert load_config([_write(tmp_path, "b.toml", text2)]) == base


_printable = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() != "" and "/" not in s and "\\" not in s
)


@settings(max_examples=60, deadline=None)
@given(
    mag=_printable,
    astrometry=_printable,
    min_pixels=st.integers(1, 2**13),
    timeout=st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
    threshold=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    kernel_size=st.one_of(st.none(), st.integers(0, 100).map(lambda n: 2 * n + 1)),
    source=st.sampled_from(["coadd", "calexp"]),
    pool=st.booleans(),
    threads=st.integers(0, 1024),
    url_tail=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),  # no control characters
)
def test_property_toml_round_trip(
    mag: str,
    astrometry: str,
    min_pixels: int,
    timeout: float,
    threshold: float,
    kernel_size: int | None,
    source: str,
    pool: bool,
    threads: int,
    url_tail: str,
) -> None:
    cfg = apply_overrides(
        PipelineConfig(),
        {
            "calibrate.astrometry_mag": mag,
            "difference.template_source": source,
            "calibrate.astrometry_refcat": astrometry,
            "dia.detection.min_pixels": min_pixels,
            "dia.detection.threshold": threshold,
            "apdb.connection_timeout": timeout,
            "apdb.connection_pool": pool,
            "apdb.db_url": "sqlite:///" + url_tail,
            "difference.decorrelation.kernel_size": kernel_size,
            "process.n_threads": threads,
        },
    )
    text = config_to_toml(cfg)
    back = cfgmod._apply(PipelineConfig(), cfgmod._mapping_settings(tomllib.loads(text), "round trip"))
    assert back == cfg
    assert config_sha256(back) == config_sha256(cfg)


def test_sha256_tracks_values_only() -> None:
    a = config_sha256(PipelineConfig())
    assert len(a) == 64 and int(a, 16) >= 0
    assert config_sha256(load_config()) == a
    assert config_sha256(load_config(overrides=["process.n_threads=1"])) != a
    # 60 and 60.0 are the same float setting once normalised
    assert config_sha256(load_config(overrides=["apdb.connection_timeout=60"])) == a
    assert config_sha256(load_config(overrides=["apdb.connection_timeout=60.000001"])) != a


def test_describe_type_phrases() -> None:
    assert cfgmod.describe_type(bool) == "true or false"
    assert cfgmod.describe_type(tuple[int, ...]) == "an array of an integer"
    assert cfgmod.describe_type(typing.Literal["a"]) == "one of 'a'"
    assert cfgmod.describe_type(str | None) == "a string or none"


def test_tuple_and_optional_str_fields_in_a_new_section() -> None:
    """The machinery supports the field kinds later sections will need."""

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Extra(cfgmod.ConfigSection):
        """An extra section."""

        widths: tuple[int, ...] = cfgmod.opt((1, 2), "Widths.")
        label: str | None = cfgmod.opt("x", "Label.")

    assert Extra(widths=[3, 4]).widths == (3, 4)
    assert Extra(label="none").label is None
    # None with a non-None default is written as "none" and reads back as None
    lines: list[str] = []
    cfgmod._section_toml(Extra(label=None), "extra.", lines)
    assert 'label = "none"' in lines
    data = tomllib.loads("\n".join(lines))["extra"]
    assert Extra(**data) == Extra(label=None)
    with pytest.raises(
        ConfigError, match=r"'widths' = \[1\.5\] has the wrong type: expected an array of an integer"
    ):
        Extra(widths=[1.5])  # type: ignore[list-item]
    from apfast._configbase import _coerce

    assert _coerce((1, "a"), tuple[int, str]) == (1, "a")
    from apfast._configbase import _MISSING

    assert _coerce((1,), tuple[int, str]) is _MISSING
    assert cfgmod._toml_value((1.5, "x", True)) == '[1.5, "x", true]'
    assert cfgmod._toml_value(math.inf) == "inf" and cfgmod._toml_value(math.nan) == "nan"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Inner(cfgmod.ConfigSection):
    """_Inner settings."""

    order: int = cfgmod.opt(1, "Polynomial order (>= 0).")

    def _validate(self) -> None:
        if self.order < 0:
            self._fail("order", self.order, "use an order >= 0")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Outer(cfgmod.ConfigSection):
    """_Outer settings."""

    do_fit: bool = cfgmod.opt(True, "Fit at all.")
    inner: _Inner = cfgmod.subsection(_Inner)


def test_nested_subsections_name_full_dotted_keys() -> None:
    """A sub-config inside a section (isr.overscan style) reports 'outer.inner.key'."""
    cfgmod._register_prefixes(_Outer, "outer.")
    assert list(config_fields(_Outer)) == ["do_fit", "inner.order"]
    assert config_fields(_Outer)["inner.order"].doc == "Polynomial order (>= 0)."
    with pytest.raises(
        ConfigError, match=r"config key 'outer\.inner\.order' = -1 is invalid: use an order >= 0"
    ):
        _Outer(inner=_Inner(order=-1))
    lines: list[str] = []
    cfgmod._section_toml(_Outer(), "outer.", lines)
    assert "[outer]" in lines and "[outer.inner]" in lines
    data = tomllib.loads("\n".join(lines))["outer"]
    assert _Outer(do_fit=data["do_fit"], inner=_Inner(**data["inner"])) == _Outer()


def test_rubin_spellings_from_the_ap_pipe_docs(capsys) -> None:
    from apfast.run.cli import main

    cfg = load_config(overrides=["diaPipe.apdb.db_url=sqlite:///apdb/association.db",
                                 "diaPipe.apdb.isolation_level=READ_UNCOMMITTED"])
    assert cfg.apdb.db_url == "sqlite:///apdb/association.db"
    assert cfg.apdb.isolation_level == "READ_UNCOMMITTED"
    # Rubin's calexp-template config file selects the built-in TOML
    assert main(["config", "show", "-C", "/opt/lsst/ap_pipe/config/calexpTemplates.py",
                 "-c", "diaPipe.apdb.db_url=sqlite:///x.db"]) == 0
    out = capsys.readouterr().out
    assert 'template_source = "calexp"' in out and 'db_url = "sqlite:///x.db"' in out
    assert "-c diaPipe.apdb.db_url=... -> apdb.db_url" in out
