"""Dataset layouts beyond HW3P2 Spring/Fall 2022 and ctclab's corpus: one module each, tried before
the built-in ones wherever ctclab reads a dataset folder (fetch, preprocess, `ctclab predict`).

    # src/ctclab/datasets/flat_npz.py
    from ctclab.layouts import Layout, Split, has, register_layout

    @register_layout("flat_npz")
    def flat_npz(d):                       # one folder; None when it is not this layout
        if not has(d, "train_feats", "train_labels", "dev_feats", "dev_labels", "test_feats"):
            return None
        splits = {s: Split(d / f"{s}_feats", d / f"{s}_labels") for s in ("train", "dev")}
        splits["test"] = Split(d / "test_feats", None)
        order = sorted(p.name for p in (d / "test_feats").glob("*.npy"))   # the submission's row order
        return Layout("flat_npz", d, splits, order, submission_format="spring2022")

Each split is a folder of per-utterance MFCC .npy files ([T, dim]) and, where labels exist, a
folder of transcript .npy files of the same names (ARPAbet symbols). A new CSV format is
`register_format(name, header, chars)` in the same module. This folder is a dependency of every
stage that reads a dataset (dvc.yaml).
"""
