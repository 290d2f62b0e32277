"""The study table of a PanFoMaBench build: one `PanFoMaBenchStudy` row per `.h5ad` file, read from CSV or YAML.

A row names the file, its cancer type and tissue, the `obs` columns holding patient and cell type, and how to
read it (`layer`, `gene_column`, `allow_non_counts`); licence and source go to the dataset card. This module
validates rows and resolves relative paths; it reads no expression data.
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class PanFoMaBenchStudy:
    """One row of the study table.

    Attributes:
        name: study name (the `study` column; unique; letters, digits, `_`, `-`, `.`).
        path: the `.h5ad` file (relative paths are resolved against the table's folder).
        cancer_type: cancer type of every cell of the study.
        tissue: tissue of every cell of the study.
        patient_column: `obs` column holding the patient (donor) id.
        cell_type_column: `obs` column holding cell types; `None` -> every cell is "unknown".
        layer: read counts from `layers[layer]` instead of `X`.
        gene_column: `var` column holding gene names instead of `var_names`.
        allow_non_counts: accept log-normalised / normalised values, skipping count-based QC.
        license: licence of the source data (goes to the dataset card).
        source: where the data come from (URL, citation).
    """

    name: str
    path: str
    cancer_type: str
    tissue: str
    patient_column: str = "patient"
    cell_type_column: str | None = None
    layer: str | None = None
    gene_column: str | None = None
    allow_non_counts: bool = False
    license: str = "unknown"
    source: str = ""

    def validate(self) -> "PanFoMaBenchStudy":
        """Raise `ValueError` on an unusable row; return self."""
        for key in ("name", "path", "cancer_type", "tissue", "patient_column"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"study {self.name!r}: field {key!r} is required and must be a non-empty string.")
        allowed = set(string.ascii_letters + string.digits + "_-.")
        if not set(self.name) <= allowed:
            raise ValueError(
                f"study name {self.name!r} may only contain letters, digits, '_', '-' and '.' "
                "(it becomes part of cell and patient ids)."
            )
        if not isinstance(self.allow_non_counts, bool):
            raise TypeError(f"study {self.name!r}: allow_non_counts must be a boolean, got {self.allow_non_counts!r}.")
        return self


_STUDY_FIELDS = tuple(f.name for f in fields(PanFoMaBenchStudy))
_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "": False}


def _study_from_mapping(row: dict, base_dir: Path, where: str) -> PanFoMaBenchStudy:
    unknown = sorted(set(row) - set(_STUDY_FIELDS) - {"study"})
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}; allowed: {list(_STUDY_FIELDS)}.")
    values: dict[str, Any] = {}
    for key, value in row.items():
        key = "name" if key == "study" else key
        if isinstance(value, str):
            value = value.strip()
        if value in ("", None) and key not in ("name", "path", "cancer_type", "tissue"):
            continue
        values[key] = value
    flag = values.get("allow_non_counts", False)
    if isinstance(flag, str):
        if flag.lower() not in _BOOL_STRINGS:
            raise ValueError(f"{where}: allow_non_counts must be true/false, got {flag!r}.")
        values["allow_non_counts"] = _BOOL_STRINGS[flag.lower()]
    missing = [k for k in ("name", "path", "cancer_type", "tissue") if k not in values]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing} (required: name, path, cancer_type, tissue).")
    path = Path(str(values["path"])).expanduser()
    values["path"] = str(path if path.is_absolute() else base_dir / path)
    values = {k: (str(v) if k not in ("allow_non_counts",) and v is not None else v) for k, v in values.items()}
    return PanFoMaBenchStudy(**values).validate()


def read_study_table(path: str | Path) -> list[PanFoMaBenchStudy]:
    """Read a study table from CSV or YAML into `PanFoMaBenchStudy` rows.

    CSV: a header with the `PanFoMaBenchStudy` field names (`study` is accepted for `name`). YAML: a
    list of mappings, or `{"studies": [...]}`. Relative `path`s are resolved against the table's folder.

    Example:
        >>> import tempfile, pathlib
        >>> table = pathlib.Path(tempfile.mkdtemp()) / "studies.csv"
        >>> _ = table.write_text("name,path,cancer_type,tissue\\ncrc,crc.h5ad,colorectal cancer,colon\\n")
        >>> read_study_table(table)[0].cancer_type
        'colorectal cancer'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study table {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        rows = data.get("studies") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a YAML list of studies (or a mapping with key 'studies').")
    else:
        raise ValueError(f"study table {path} must be .csv, .yaml or .yml, got {suffix!r}.")
    if not rows:
        raise ValueError(f"study table {path} lists no studies.")
    return [_study_from_mapping(dict(row), path.parent, f"{path} row {i + 1}") for i, row in enumerate(rows)]


