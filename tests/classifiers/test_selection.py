"""featx.classifiers.selection: C by cross-validated log-likelihood, the layer by the one-standard-error rule."""

import numpy as np
import pytest

from conftest import blobs, write_codes
from featx.classifiers.fit import fit, fit_cell
from featx.classifiers.protocol import parse_train_size, protocol_for
from featx.classifiers.selection import (
    LOGLIK,
    SCORE,
    Candidate,
    best_C,
    choose_layer,
    pack_folds,
    paired_deficit,
    unpack_folds,
)

CLASSES = ["a", "b", "c"]


def _splits(y, test_every=4):
    s = np.array(["train"] * len(y), dtype=object)
    s[::test_every] = "test"
    return s


def test_best_C_ranks_by_accuracy_or_by_log_likelihood():
    Cs = (0.01, 0.1, 1.0)
    scores = [(0.90, -0.50), (0.95, -0.40), (0.90, -0.30)]  # (accuracy, log-likelihood)
    assert best_C(Cs, scores, SCORE) == 1
    assert best_C(Cs, scores, LOGLIK) == 2
    tied = [(0.90, -0.3), (0.95, -0.3), (0.95, -0.3)]  # a log-likelihood tie: accuracy, then the smaller C
    assert best_C(Cs, tied, LOGLIK) == 1


def test_paired_deficit_against_a_hand_computed_standard_error():
    ref = [-0.50, -0.52, -0.48, -0.51, -0.49]
    d = np.array([0.02, -0.01, 0.05, 0.00, 0.03])
    other = list(np.array(ref) - d)
    sem = np.sqrt(np.sum((d - d.mean()) ** 2) / 4) / np.sqrt(5)  # 0.01020
    assert paired_deficit(ref, other) == pytest.approx(d.mean() - sem)
    assert paired_deficit(ref, other, se=2.0) == pytest.approx(d.mean() - 2 * sem)
    assert paired_deficit([-0.5], [-0.6]) == pytest.approx(0.1)  # one fold: no standard error


def _cand(name, depth, folds, rule=LOGLIK, score=0.9):
    return Candidate(name, depth, score, float(np.mean(folds)), rule, tuple(folds))


def test_the_deepest_layer_within_one_paired_standard_error_wins():
    ref = [-0.50, -0.52, -0.48, -0.51, -0.49]
    noisy = list(np.array(ref) - [0.02, -0.02, 0.05, -0.01, 0.01])  # 0.01 worse on average, SE 0.012
    steady = list(np.array(ref) - [0.03, 0.031, 0.029, 0.03, 0.03])  # 0.03 worse on every fold
    assert choose_layer([_cand("early", 0.3, ref), _cand("top", 1.0, noisy)]) == "top"
    assert choose_layer([_cand("early", 0.3, ref), _cand("top", 1.0, steady)]) == "early"
    # order never matters; a concatenation counts as shallower than any single layer
    assert choose_layer([_cand("top", 1.0, noisy), _cand("early", 0.3, ref)]) == "top"
    assert choose_layer([_cand("early+top", -1.0, ref), _cand("top", 1.0, noisy)]) == "top"
    assert choose_layer([_cand("early+top", -1.0, ref), _cand("top", 1.0, steady)]) == "early+top"


def test_without_paired_folds_the_val_score_rule_decides():
    ref = [-0.50, -0.52, -0.48, -0.51, -0.49]
    noisy = list(np.array(ref) - [0.02, -0.02, 0.05, -0.01, 0.01])
    # a hold-out cell among CV cells (mixed rules), or folds that do not pair up: best val_score
    assert (
        choose_layer([_cand("early", 0.3, ref, score=0.95), _cand("top", 1.0, noisy, rule=SCORE)]) == "early"
    )
    assert choose_layer([_cand("early", 0.3, ref, score=0.95), _cand("top", 1.0, noisy[:4])]) == "early"
    # an exact tie of both scores goes to the deeper layer
    assert choose_layer([Candidate("a", 0.2, 0.9, -0.3), Candidate("b", 0.8, 0.9, -0.3)]) == "b"


def test_fold_scores_survive_csv():
    folds = (-0.123456789012, -1.5, 0.0)
    assert unpack_folds(pack_folds(folds)) == pytest.approx(folds, rel=1e-8)
    assert unpack_folds("") == () and unpack_folds(None) == () and unpack_folds(list(folds)) == folds


def test_cv_softmax_chooses_C_by_the_cross_validated_log_likelihood(tmp_path):
    """Recomputed independently: scikit-learn's own StratifiedKFold, pipeline and log-likelihood."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.classifiers.rows import select_rows
    from featx.store.codes import CodesFile

    X, y = blobs(16, 3, 16, sep=1.5, seed=4)  # 12 training images per class: CV, overlapping classes
    path = write_codes(tmp_path / "s.h5", {"L": X}, y, _splits(y), CLASSES)
    Cs = (0.001, 0.01, 0.1, 1.0, 10.0)
    proto = protocol_for("softmax", Cs=Cs)
    r = fit_cell(path, ["L"], proto, "all", 0, warm=False)
    assert r["val_source"] == "5-fold cv" and r["val_rule"] == LOGLIK and len(r["val_folds"]) == 5
    with CodesFile(path) as f:
        tr = select_rows(f, proto, parse_train_size("all"), 0).train
    Xt, yt = X[tr], y[tr]
    per_C = {}
    for C in Cs:
        folds = []
        for a, b in StratifiedKFold(5, shuffle=True, random_state=0).split(Xt, yt):
            m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(Xt[a], yt[a])
            folds.append(np.mean(np.log(np.clip(m.predict_proba(Xt[b])[np.arange(len(b)), yt[b]], 1e-15, 1))))
        per_C[C] = folds
    chosen = max(Cs, key=lambda C: np.mean(per_C[C]))
    assert r["C"] == chosen
    assert r["val_folds"] == pytest.approx(per_C[chosen], rel=1e-6)
    assert r["val_tiebreak"] == pytest.approx(np.mean(per_C[chosen]), rel=1e-6)
    svm = fit_cell(path, ["L"], protocol_for("svm", Cs=Cs), "all", 0)  # no likelihood: the val_score rule
    assert svm["val_source"] == "5-fold cv" and svm["val_rule"] == SCORE


def test_fit_keeps_the_top_layer_when_the_folds_cannot_tell_it_from_the_best(tmp_path):
    """Two equally noisy views of the same blobs: the shallow one scores a little better on the folds,
    within noise, so the deeper one is chosen (the best-log-likelihood rule would take the shallow
    one); a shallow layer better beyond noise is chosen however deep the other is."""
    X, y = blobs(16, 3, 16, sep=1.5, seed=4)
    rng = np.random.default_rng(0)
    early, top = X + rng.normal(size=X.shape) * 0.5, X + rng.normal(size=X.shape) * 0.5
    junk = rng.normal(size=X.shape)
    path = write_codes(
        tmp_path / "d.h5",
        {"early": early, "top": top, "junk": junk},
        y,
        _splits(y),
        CLASSES,
        depths={"early": 0.3, "top": 1.0, "junk": 0.9},
    )
    proto = protocol_for("softmax", Cs=(0.01, 0.1, 1.0))
    rep = fit(path, ["early", "top"], proto, seeds=(0, 1))
    assert {r["val_rule"] for r in rep.results} == {LOGLIK}
    c = {x.name: x for x in rep.candidates()}
    assert len(c["top"].folds) == 10  # 5 folds x 2 seeds, paired
    assert c["early"].tiebreak > c["top"].tiebreak and paired_deficit(c["early"].folds, c["top"].folds) <= 0
    assert rep.best == "top"
    rep = fit(path, ["junk", "early"], proto, seeds=(0, 1))
    assert rep.best == "early"  # the deeper junk layer is worse beyond noise


def test_the_rule_is_part_of_the_protocols_identity_where_it_applies():
    """Bench cells fitted under the older cross-validated rule get other keys (refitted, not reused);
    protocols the rule cannot touch keep theirs."""
    assert protocol_for("softmax").to_dict()["selection"] == "cv-loglik-1se"
    assert protocol_for("softmax", cv=3, min_val_per_class=0).to_dict()["selection"] == "cv-loglik-1se"
    for p in (
        protocol_for("svm"),
        protocol_for("softmax", min_val_per_class=0),
        protocol_for(preset="vissl-svm"),
    ):
        assert "selection" not in p.to_dict()
