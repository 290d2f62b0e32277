"""Known human gene families used to check gene programs (GRN task).

The lists are biological facts written from the literature, not copied files:

- MHC class II: the HLA-D region genes (HLA-DR/DP/DQ/DM/DO alpha and beta chains).
- MHC class I: the classical and non-classical class I heavy chains plus their obligate light chain B2M.
- CD3: the CD3 delta/epsilon/gamma chains of the T-cell receptor complex.
- Ribosomal: cytosolic ribosomal proteins RPL*/RPS* (a regular expression, so that lncRNAs such as
  ``RP11-...`` and kinases such as ``RPS6KA1`` are *not* counted as ribosomal).
- Interferon-stimulated genes: a core type-I interferon response set.
- Cell cycle S and G2/M: the Tirosh et al. 2016 (Science) lists as distributed with Seurat
  (``cc.genes``); both the 2016 symbols and their current HGNC names (e.g. ``MLF1IP`` -> ``CENPU``) are
  listed so that either naming matches.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

MHC_CLASS_II = (
    "HLA-DRA", "HLA-DRB1", "HLA-DRB3", "HLA-DRB4", "HLA-DRB5", "HLA-DPA1", "HLA-DPB1",
    "HLA-DQA1", "HLA-DQA2", "HLA-DQB1", "HLA-DQB2", "HLA-DMA", "HLA-DMB", "HLA-DOA", "HLA-DOB",
)
MHC_CLASS_I = ("HLA-A", "HLA-B", "HLA-C", "HLA-E", "HLA-F", "HLA-G", "B2M")
CD3_COMPLEX = ("CD3D", "CD3E", "CD3G")
INTERFERON_STIMULATED = (
    "ISG15", "IFI6", "IFI27", "IFI44", "IFI44L", "IFIT1", "IFIT2", "IFIT3", "IFIT5", "MX1", "MX2",
    "OAS1", "OAS2", "OAS3", "OASL", "RSAD2", "IFITM1", "IFITM3", "IRF7", "STAT1", "XAF1", "HERC5",
    "EPSTI1", "CMPK2", "LY6E", "BST2", "USP18", "SAMD9L", "PLSCR1", "IFI35",
)
CELL_CYCLE_S = (
    "MCM5", "PCNA", "TYMS", "FEN1", "MCM2", "MCM4", "RRM1", "UNG", "GINS2", "MCM6", "CDCA7", "DTL",
    "PRIM1", "UHRF1", "MLF1IP", "CENPU", "HELLS", "RFC2", "RPA2", "NASP", "RAD51AP1", "GMNN", "WDR76",
    "SLBP", "CCNE2", "UBR7", "POLD3", "MSH2", "ATAD2", "RAD51", "RRM2", "CDC45", "CDC6", "EXO1",
    "TIPIN", "DSCC1", "BLM", "CASP8AP2", "USP1", "CLSPN", "POLA1", "CHAF1B", "BRIP1", "E2F8",
)
CELL_CYCLE_G2M = (
    "HMGB2", "CDK1", "NUSAP1", "UBE2C", "BIRC5", "TPX2", "TOP2A", "NDC80", "CKS2", "NUF2", "CKS1B",
    "MKI67", "TMPO", "CENPF", "TACC3", "FAM64A", "PIMREG", "SMC4", "CCNB2", "CKAP2L", "CKAP2", "AURKB",
    "BUB1", "KIF11", "ANP32E", "TUBB4B", "GTSE1", "KIF20B", "HJURP", "CDCA3", "HN1", "JPT1", "CDC20",
    "TTK", "CDC25C", "KIF2C", "RANGAP1", "NCAPD2", "DLGAP5", "CDCA2", "CDCA8", "ECT2", "KIF23", "HMMR",
    "AURKA", "PSRC1", "ANLN", "LBR", "CKAP5", "CENPE", "CTCF", "NEK2", "G2E3", "GAS2L3", "CBX5", "CENPA",
)
# Cytosolic ribosomal proteins: RPL<n>[A|AL|L|X|Y<n>], RPS<n>[...], the acidic stalk RPLP0-2 and RPSA.
RIBOSOMAL_PATTERN = re.compile(r"^(RP[LS]\d+(A|AL|L|X|Y\d?)?|RPLP[0-2]|RPSA)$")


def default_gene_families(gene_names: Iterable[str]) -> dict[str, list[str]]:
    """The default families restricted to ``gene_names`` (the ribosomal family is matched by pattern).

    Example:
        >>> fams = default_gene_families(["CD3D", "CD3E", "RPL3", "RPS6KA1", "RP11-34P13.3"])
        >>> fams["CD3"], fams["ribosomal"]
        (['CD3D', 'CD3E'], ['RPL3'])
    """
    names = list(dict.fromkeys(str(g) for g in gene_names))
    present = set(names)
    fixed: Mapping[str, tuple[str, ...]] = {
        "MHC_class_II": MHC_CLASS_II,
        "MHC_class_I": MHC_CLASS_I,
        "CD3": CD3_COMPLEX,
        "interferon_stimulated": INTERFERON_STIMULATED,
        "cell_cycle_S": CELL_CYCLE_S,
        "cell_cycle_G2M": CELL_CYCLE_G2M,
    }
    families = {name: [g for g in genes if g in present] for name, genes in fixed.items()}
    families["ribosomal"] = [g for g in names if RIBOSOMAL_PATTERN.match(g)]
    return families
