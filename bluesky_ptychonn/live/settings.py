"""The consumer's configuration: a TOML file, ``PTYCHONN_*`` environment variables and arguments.

The file (see ``callbacks/ptychonn.toml``)::

    [model]     checkpoint = "...", device = "auto", compile = false, reload_interval_s = 10
    [tiled]     uri = "http://127.0.0.1:8000", api_key_env = "TILED_API_KEY"
    [zmq]       address = "tcp://127.0.0.1:5578", publish_address = "tcp://127.0.0.1:5577"
    [callback]  data_roots = ["/data"], frames_key = "diffraction", ...  (CallbackConfig)
    [live]      batch_size = 64, publish_interval_s = 1.0, ...            (LiveOptions)
    [refine]    enabled = false, engine = "lsqml", epochs = 200, ...     (RefineSection)
    [share]     by = "uid", index = 0, count = 2                          (RunShare)

Any key can be overridden from the environment, ``PTYCHONN_<TABLE>__<KEY>`` (for example
``PTYCHONN_TILED__URI``, ``PTYCHONN_LIVE__BATCH_SIZE``; lists and tables as JSON). Keyword
arguments of :func:`load_config` win over the environment, which wins over the file. Relative
paths in the file resolve against the file's folder. The Tiled API key is never written in the
file: it comes from the environment variable that ``api_key_env`` names (``$TILED_API_KEY``).
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from ..core.base_model import BASE_MODELS, base_model_path
from ..core.config import Frozen
from ..core.engine import LiveOptions
from ..core.iterative import IterativeOptions
from ..core.refine import REFINE_OPTIONS, RUN_ARRIVAL_TIMEOUT_S
from ..errors import ConfigurationError
from .config import CallbackConfig, RunShare

#: Prefix of the environment variables that override the file, nested keys joined by ``__``.
ENV_PREFIX = "PTYCHONN_"


class ModelSection(Frozen):
    """``[model]``: which checkpoint the consumer runs, where, and how it notices a new one."""

    checkpoint: Path = Field(
        description="The model to load: a safetensors checkpoint, or a shipped base model's name (default-64)."
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:n]'.")
    compile: bool = Field(
        False,
        description=(
            "Run the network as a torch.compile graph, built when the model loads (a hot reload "
            "included): seconds to build, then faster (see core.inference.Predictor)."
        ),
    )
    reload_interval_s: float = Field(10.0, ge=0, description="How often to look for a new checkpoint; 0 never.")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _base_model(cls, value: Any) -> Any:
        """A shipped base model's name stands for its file inside the installed package."""
        if str(value) in BASE_MODELS:
            return base_model_path(str(value))
        return value


class TiledSection(Frozen):
    """``[tiled]``: the server the results are written to, and where its API key comes from."""

    uri: str = Field(description="Tiled server root URI.")
    api_key_env: str = Field("TILED_API_KEY", description="Environment variable holding the API key (writes need one).")
    api_key: SecretStr | None = Field(
        None,
        exclude=True,  # never dumped into metadata or a file with the rest of the configuration
        description="The API key; read from $api_key_env when not given. Refused in a configuration file.",
    )

    @model_validator(mode="before")
    @classmethod
    def _key_from_environment(cls, data: Any) -> Any:
        # The indirection keeps the secret out of the file, which gets copied, committed and shared.
        if isinstance(data, dict) and data.get("api_key") is None:
            name = data.get("api_key_env", cls.model_fields["api_key_env"].default)
            if isinstance(name, str) and os.environ.get(name):
                data = {**data, "api_key": os.environ[name]}
        return data


class ZmqSection(Frozen):
    """``[zmq]``: the two sides of the ``bluesky-0MQ-proxy``."""

    address: str = Field("tcp://127.0.0.1:5578", description="The proxy's output address, where the consumer listens.")
    publish_address: str = Field(
        "tcp://127.0.0.1:5577",
        description="The proxy's input address, where the RunEngine's Publisher sends (see callbacks/).",
    )
    prefix: str = Field("", pattern=r"^[^ ]*$", description="0MQ topic prefix, as given to the Publisher; no spaces.")
    client_secret_key: Path | None = Field(
        None,
        description=(
            "CURVE: this consumer's secret key file (zmq.auth certificate); with server_public_key, for a proxy "
            "started with --out-curve-secret, which admits only the public keys in its --out-curve-client-keys folder."
        ),
    )
    server_public_key: Path | None = Field(None, description="CURVE: the proxy's public key file (.key).")

    @model_validator(mode="after")
    def _both_keys(self) -> ZmqSection:
        if (self.client_secret_key is None) != (self.server_public_key is None):
            raise ValueError("[zmq] CURVE needs both client_secret_key and server_public_key, or neither")
        return self

    def curve(self) -> Any:
        """bluesky's ``ClientCurve`` for the ``RemoteDispatcher`` (None without keys)."""
        if self.client_secret_key is None or self.server_public_key is None:
            return None
        from bluesky.callbacks.zmq import ClientCurve

        return ClientCurve(secret_path=self.client_secret_key, server_public_key=self.server_public_key)


class RefineSection(Frozen):
    """``[refine]``: after each run's live image is final, refine it with pty-chi seeded by that image.

    One run at a time, each in a child process of the consumer at a lowered priority, which writes
    ``processed/<uid>/refined``: the next runs' live images come first (see
    :class:`~bluesky_ptychonn.archive.refine_worker.RefineWorker`). Defaults are those of
    :data:`~bluesky_ptychonn.core.refine.REFINE_OPTIONS`.
    """

    enabled: bool = Field(False, description="Refine every run automatically (needs a [tiled] section).")
    engine: Literal["epie", "lsqml"] = Field(REFINE_OPTIONS.engine, description="pty-chi engine.")
    epochs: int = Field(REFINE_OPTIONS.epochs, ge=1, description="Most epochs per run.")
    stop_tolerance: float | None = Field(
        REFINE_OPTIONS.stop_tolerance,
        gt=0,
        lt=1,
        description="Stop once the error falls by less than this fraction over 10 epochs; None runs all epochs.",
    )
    refine_probe: bool = Field(False, description="Also refine the probe.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Where pty-chi computes.")
    run_timeout_s: float = Field(
        RUN_ARRIVAL_TIMEOUT_S, ge=0, description="Longest wait for the raw run's stop document to reach Tiled."
    )
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description=(
            "Added to the refinement process's nice value (Linux), so that live inference and the scan come "
            "first; 0 leaves it alone."
        ),
    )

    def options(self) -> IterativeOptions:
        """The pty-chi options this section describes (the refinement defaults, with its fields)."""
        fields = ("engine", "epochs", "stop_tolerance", "refine_probe", "device")
        return IterativeOptions(**{**REFINE_OPTIONS.model_dump(), **{k: getattr(self, k) for k in fields}})


#: The configuration file being loaded; read by :meth:`ServiceConfig.settings_customise_sources`,
#: which pydantic-settings calls without a way to pass the path given at run time.
_config_file: ContextVar[Path | None] = ContextVar("ptychonn_config_file", default=None)


class _ConfigFileSource(TomlConfigSettingsSource):
    """The TOML file, with relative paths resolved against its folder and a written API key refused."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        data = super()._read_file(file_path)
        tiled = data.get("tiled")
        if isinstance(tiled, dict) and any(key.lower() == "api_key" for key in tiled):
            env = tiled.get("api_key_env", TiledSection.model_fields["api_key_env"].default)
            raise ConfigurationError(
                f"{file_path}: [tiled] api_key must not be written in a configuration file; "
                f"remove it and set ${env} in the consumer's environment"
            )
        base = file_path.resolve().parent
        model = data.get("model")
        if (
            isinstance(model, dict)
            and isinstance(model.get("checkpoint"), str)
            and model["checkpoint"] not in BASE_MODELS
        ):
            model["checkpoint"] = str(base / model["checkpoint"])
        zmq = data.get("zmq")
        if isinstance(zmq, dict):
            for key in ("client_secret_key", "server_public_key"):
                if isinstance(zmq.get(key), str):
                    zmq[key] = str(base / zmq[key])
        callback = data.get("callback")
        if isinstance(callback, dict) and isinstance(callback.get("data_roots"), list):
            callback["data_roots"] = [str(base / r) if isinstance(r, str) else r for r in callback["data_roots"]]
        if isinstance(callback, dict) and isinstance(callback.get("backup_dir"), str):
            callback["backup_dir"] = str(base / callback["backup_dir"])
        return data


class ServiceConfig(BaseSettings, Frozen):
    """The whole consumer configuration: arguments, then ``PTYCHONN_*`` variables, then the file."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
    )

    model: ModelSection = Field(description="The checkpoint and its reloading.")
    tiled: TiledSection | None = Field(None, description="Where results are written; None keeps them in memory.")
    zmq: ZmqSection = Field(default_factory=ZmqSection, description="The proxy's addresses.")
    callback: CallbackConfig = Field(
        default_factory=CallbackConfig, description="Data keys and data roots ([live] holds the live policy)."
    )
    live: LiveOptions = Field(default_factory=LiveOptions, description="Batching, cadence and retry policy.")
    refine: RefineSection = Field(default_factory=RefineSection, description="Automatic pty-chi refinement.")
    share: RunShare = Field(default_factory=RunShare, description="This consumer's share of the runs.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then the file being loaded (no ``.env`` or secrets folder)."""
        path = _config_file.get()
        sources = (init_settings, env_settings)
        return sources if path is None else (*sources, _ConfigFileSource(settings_cls, toml_file=path))

    @model_validator(mode="after")
    def _live_in_one_place(self) -> ServiceConfig:
        for table in ("live", "share"):
            if table in self.callback.model_fields_set:
                raise ValueError(f"the {table} options belong in the [{table}] table, not in [callback]")
        if self.refine.enabled and self.tiled is None:
            raise ValueError("[refine] enabled needs a [tiled] section: refinement reads the run from Tiled")
        return self

    def callback_config(self) -> CallbackConfig:
        """The callback's configuration: ``[callback]`` with ``[live]`` as its live policy and ``[share]``."""
        return self.callback.model_copy(update={"live": self.live, "share": self.share})


def _describe(err: ValidationError) -> str:
    """pydantic's errors without the inputs that could hold a secret (a whole table, the key)."""
    lines = []
    for error in err.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error.get("input")
        secret = any("api_key" in str(part).lower() for part in error["loc"])
        # A scalar names the bad value; a table may carry the key; an unknown key may be a misspelt one.
        shown = not secret and error["type"] != "extra_forbidden" and isinstance(value, str | int | float | bool)
        lines.append(f"{where}{f' = {value!r}' if shown else ''}: {error['msg']}")
    return "; ".join(lines)


def _overrides_note() -> str:
    """The names (never the values) of the ``PTYCHONN_*`` variables that override the file."""
    names = sorted(name for name in os.environ if name.upper().startswith(ENV_PREFIX))
    return f" (environment overrides: {', '.join(names)})" if names else ""


def load_config(path: str | Path, **overrides: Any) -> ServiceConfig:
    """Read and validate a TOML service configuration, with environment and keyword overrides.

    Parameters
    ----------
    path : str or Path
        The TOML file; relative paths in it resolve against its folder.
    **overrides
        Top-level tables (``model=``, ``zmq=``, ...) as dicts; they win over the environment and the
        file, key by key.

    Returns
    -------
    ServiceConfig
        The validated configuration; ``tiled.api_key`` is taken from ``$<tiled.api_key_env>``.

    Raises
    ------
    ConfigurationError
        The file is missing, not TOML, holds an API key, or a value (from the file or the
        environment) is invalid. The message names the file and the bad key, never the API key.
    """
    path = Path(path)
    if not path.is_file():  # pydantic-settings skips a missing file silently
        raise ConfigurationError(f"the service configuration {path} does not exist or is not a file")
    token = _config_file.set(path)
    try:
        return ServiceConfig(**overrides)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigurationError(f"cannot read the service configuration {path}: {err}") from err
    except ValidationError as err:
        raise ConfigurationError(
            f"invalid service configuration {path}{_overrides_note()}: {_describe(err)}"
        ) from None  # the chained pydantic error would print the raw inputs again
    except SettingsError as err:  # an environment value that is not valid JSON for a list or table
        raise ConfigurationError(f"invalid service configuration {path}{_overrides_note()}: {err}") from err
    finally:
        _config_file.reset(token)
