"""The step catalogue: case types, their steps, and which steps must be recorded.

Read from TOML (``gateway/catalogue.toml`` ships with the gateway; a
``catalogue.toml`` in the gateway's data directory replaces it), validated strictly. A
case stores the catalogue ``version`` it was created under; its steps copy
``recording`` at creation, so editing the catalogue later never changes what an existing
step required (Art. 18: nothing changed after the fact).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import GatewayError

DEFAULT = Path(__file__).with_name("catalogue.toml")


class StepType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    name: str
    recording: bool


class CaseType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    steps: list[StepType] = Field(min_length=1)

    def step(self, step_type: str) -> StepType | None:
        return next((s for s in self.steps if s.type == step_type), None)


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    case_types: dict[str, CaseType]


def load_catalogue(data_dir: Path | None = None) -> Catalogue:
    """The catalogue in ``data_dir`` if there is one, else the one shipped. The gateway
    loads it at start and ``--check-config`` the same way, so that whatever stops the one
    is reported by the other."""
    path = data_dir / "catalogue.toml" if data_dir is not None else DEFAULT
    if not path.exists() and not path.is_symlink():  # a dangling link is an error below
        path = DEFAULT
    cure = "" if path == DEFAULT else " (fix it, or remove it to use the one shipped)"
    try:
        return Catalogue.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GatewayError(f"step catalogue {path}: {exc}{cure}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise GatewayError(f"step catalogue {path} is invalid: {problems}{cure}") from exc
