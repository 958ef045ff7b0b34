"""Reads Hugging Face safetensors checkpoints (single file or sharded with an index) tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from jaxmoelora.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint:
    """Maps tensor names to files and reads any slice of a tensor without loading the rest."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"cannot read the safetensors index {index}: {e}") from e
            self.files = {name: self.directory / file for name, file in weight_map.items()}
            self.source = index
        elif single.is_file():
            self.files = {name: single for name in self._open(single).keys()}
            self.source = single
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            raise CheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}"
                + (f" (found {found}; add an index file listing them)" if found else "")
                + "; pass a Hugging Face model directory saved with safetensors, or a .gguf file")
        self._handles: dict[Path, object] = {}

    def _open(self, file: Path):
        if file in getattr(self, "_handles", {}):
            return self._handles[file]
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is listed in {INDEX_FILE} but does not exist")
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {e}; the file may be truncated or not safetensors") from e
        if hasattr(self, "_handles"):
            self._handles[file] = handle
        return handle

    def release(self) -> None:
        """Closes the open files. Their memory maps go with them, so the pages read so far stop counting toward the
        process's resident memory (they would add up to the whole checkpoint by the end of a load)."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def file_of(self, name: str) -> Path:
        if name not in self.files:
            where = f"listed in {self.source}" if self.source.name == INDEX_FILE else f"in {self.source}"
            raise CheckpointError(f"tensor {name!r} is not {where}; the checkpoint is incomplete or does not match "
                                  "its config.json")
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of(name)).get_slice(name).get_shape())

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor, or only `region` of it (one slice per dimension)."""
        file = self.file_of(name)
        try:
            tensor_slice = self._open(file).get_slice(name)
            return np.asarray(tensor_slice[region] if region is not None else tensor_slice[:])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from e
