"""A version-checked view of one adapter's weights, for readers that copy each tensor
straight into its final place (the runtime's slabs) instead of materializing a dict of copies.

The same guarantees as Catalog.load_adapter: the layout is validated against the config before any
data is touched, and close() raises AdapterChanged if the files changed while they were read, so a
caller that only trusts what it copied before a clean close() never keeps a torn mix.
"""

from __future__ import annotations

from ..errors import AdapterChanged, InvalidAdapter
from .entry import AdapterEntry
from .weights import SafetensorsFile, layout, read_tensors


class AdapterReader:
    """Open with open_adapter(); use as a context manager or call close() (which checks the version).

    layout: {module: ModuleWeights}; shapes: {key: (shape, dtype_str)}; tensor(key) returns a CPU tensor
    (safetensors: read into a fresh buffer on each call; the file is open until close()).
    """

    def __init__(self, name: str, entry: AdapterEntry, weights_path: str, weight_format: str, version_now):
        self.name = name
        self.entry = entry
        self._version_now = version_now  # () -> version on storage now, or None if gone
        self._file = None
        self._tensors = None
        try:
            self._open(weights_path, weight_format)
        except InvalidAdapter:
            self._raise_if_changed()  # a file swapped or deleted under us is a change, not corruption
            raise

    def _open(self, weights_path: str, weight_format: str) -> None:
        if weight_format != "safetensors":
            # .bin is a pickle container: there is nothing to map, so the checked full read is the only way
            self.layout, self._tensors = read_tensors(self.name, weights_path, weight_format, self.entry.spec)
            self.shapes = {k: (tuple(t.shape), str(t.dtype)) for k, t in self._tensors.items()}
            return
        # Plain reads, never a mapping: a file truncated in place under a mapped read is a SIGBUS that
        # kills the process; with reads it is a short read that fails this adapter only.
        self._file = SafetensorsFile(self.name, weights_path)  # header checked; nothing else read yet
        try:
            self.layout = layout(self.name, self.entry.spec, self._file.shapes)
        except InvalidAdapter:
            self._close_file()
            raise
        self.shapes = self._file.shapes

    def tensor(self, key: str):
        """The tensor stored under `key` (CPU, the file's dtype), read into a fresh buffer."""
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._file.tensor(key)
        except InvalidAdapter:
            self._raise_if_changed()  # truncated or replaced under the read: a change, not corruption
            raise

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def _raise_if_changed(self) -> None:
        now = self._version_now()
        if now != self.entry.version:
            raise AdapterChanged(self.name, self.entry.version, now)

    def close(self) -> None:
        """Close the file, then raise AdapterChanged if the files are no longer this version."""
        self._close_file()
        self._tensors = None
        self._raise_if_changed()

    def abort(self) -> None:
        """Close the file without checking (the caller is discarding what it read)."""
        self._close_file()
        self._tensors = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_adapter(catalog, name: str, entry: AdapterEntry | None = None) -> AdapterReader:
    """An AdapterReader for one consistent version of `name` in a Catalog or MemoryCatalog.

    Raises AdapterChanged if the catalog's view is already stale (refresh and retry), InvalidAdapter
    for unreadable or inconsistent files, AdapterNotFound / InvalidAdapter from the catalog lookup.
    """
    files = catalog.files(name, entry)
    return AdapterReader(name, files.entry, files.weights_path, files.weight_format, files.version_now)


__all__ = ["AdapterReader", "open_adapter"]
