"""Central evaluation shared by both runtimes, checked against numpy references."""

import logging

import numpy as np
import pytest
import torch

from fl2ora.config import config_from_dict
from fl2ora.evaluation.evaluate import predict_probabilities
from fl2ora.experiment import build_experiment
from fl2ora.model.trainable import load_trainable_state_dict, trainable_state_dict
from fl2ora.runtime.scoring import evaluate_global_model, harmonic_mean, log_round_scores


def tiny_experiment(root):
    config = config_from_dict(
        {
            "name": "scoring",
            "seed": 5,
            "model": {"name": "tiny", "random_init": True, "device": "cpu"},
            "data": {"dataset": "image_folder", "root": str(root), "augment": False},
            "partition": {"method": "dirichlet", "num_clients": 3, "beta": 1.0, "min_samples": 5},
        }
    )
    return build_experiment(config)


def perturbed_state(state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator) for name, tensor in state.items()}


def probabilities_with(experiment, state, model=None, dataset=None):
    model = experiment.model if model is None else model
    dataset = experiment.eval_dataset if dataset is None else dataset
    load_trainable_state_dict(model, state)
    return predict_probabilities(model, dataset, experiment.config.eval.batch_size, experiment.device)


def numpy_accuracy(probs, labels):
    return float(np.mean(probs.argmax(axis=1) == labels))


def numpy_confidence(probs):
    return float(np.mean(probs.max(axis=1).astype(np.float64)))


def numpy_nll(probs, labels):
    true_class = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.log(np.maximum(true_class, 1e-12))))


def test_evaluate_loaded_state(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    initial = trainable_state_dict(experiment.model)
    state = perturbed_state(initial, seed=0)
    initial_probs = probabilities_with(experiment, initial)
    expected_probs = probabilities_with(experiment, state)
    assert not np.allclose(initial_probs, expected_probs), "the perturbation must change the predictions"

    # The model contains the initial state again, so skipping the load would return initial_probs.
    load_trainable_state_dict(experiment.model, initial)
    scores, probs = evaluate_global_model(experiment, state)

    np.testing.assert_array_equal(probs, expected_probs)
    labels = experiment.eval_labels
    assert set(scores) == {"clients", "mean", "pooled"}
    assert sorted(scores["clients"]) == [0, 1, 2]
    for client_id, rows in enumerate(experiment.client_eval_rows):
        client = scores["clients"][client_id]
        assert client["accuracy"] == pytest.approx(numpy_accuracy(probs[rows], labels[rows]))
        assert client["confidence"] == pytest.approx(numpy_confidence(probs[rows]))
        assert client["nll"] == pytest.approx(numpy_nll(probs[rows], labels[rows]))
    for name in ("accuracy", "ece", "mce", "ace", "nll"):
        per_client = [scores["clients"][k][name] for k in range(3)]
        assert scores["mean"][name] == pytest.approx(np.mean(per_client)), name
    assert scores["pooled"]["accuracy"] == pytest.approx(numpy_accuracy(probs, labels))
    assert scores["pooled"]["nll"] == pytest.approx(numpy_nll(probs, labels))


def test_evaluate_domain_groups(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    experiment.splits.groups = {"first": [0], "rest": [1, 2]}
    scores, probs = evaluate_global_model(experiment, trainable_state_dict(experiment.model))

    labels = experiment.eval_labels
    rows = experiment.client_eval_rows
    assert list(scores["groups"]) == ["first", "rest"]
    assert scores["groups"]["first"]["mean"] == scores["clients"][0]
    rest_accuracy = np.mean([numpy_accuracy(probs[rows[k]], labels[rows[k]]) for k in (1, 2)])
    assert scores["groups"]["rest"]["mean"]["accuracy"] == pytest.approx(rest_accuracy)
    rest_rows = np.concatenate([rows[1], rows[2]])
    assert scores["groups"]["rest"]["pooled"]["accuracy"] == pytest.approx(numpy_accuracy(probs[rest_rows], labels[rest_rows]))


def test_evaluate_heldout_sets(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    heldout = experiment.eval_dataset.subset(experiment.client_eval_rows[1])
    experiment.heldout = {"unseen": heldout}
    state = perturbed_state(trainable_state_dict(experiment.model), seed=1)
    scores, _ = evaluate_global_model(experiment, state)

    heldout_probs = probabilities_with(experiment, state, dataset=heldout)
    heldout_labels = np.asarray(heldout.labels)
    assert list(scores["heldout"]) == ["unseen"]
    unseen = scores["heldout"]["unseen"]
    assert unseen["accuracy"] == pytest.approx(numpy_accuracy(heldout_probs, heldout_labels))
    assert unseen["confidence"] == pytest.approx(numpy_confidence(heldout_probs))
    assert unseen["nll"] == pytest.approx(numpy_nll(heldout_probs, heldout_labels))
    # The held-out set is client 1's test split, so it scores as client 1 does.
    for name, value in scores["clients"][1].items():
        assert unseen[name] == pytest.approx(value), name


def test_evaluate_base_to_new(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    # A second classifier object replaces the new-class model, so the state must be loaded into it too.
    new_dataset = experiment.eval_dataset.subset(experiment.client_eval_rows[0])
    experiment.new_model = tiny_experiment(tiny_image_folder).model
    experiment.new_eval_dataset = new_dataset
    state = perturbed_state(trainable_state_dict(experiment.model), seed=2)
    scores, probs = evaluate_global_model(experiment, state)

    part = scores["base_to_new"]
    assert part["local"] == scores["mean"]
    assert part["base"] == scores["pooled"]
    new_probs = probabilities_with(experiment, state, model=experiment.new_model, dataset=new_dataset)
    new_accuracy = numpy_accuracy(new_probs, np.asarray(new_dataset.labels))
    assert part["new"]["accuracy"] == pytest.approx(new_accuracy)
    assert part["new"]["nll"] == pytest.approx(numpy_nll(new_probs, np.asarray(new_dataset.labels)))
    base_accuracy = numpy_accuracy(probs, experiment.eval_labels)
    expected = 2 * base_accuracy * new_accuracy / (base_accuracy + new_accuracy)
    assert part["harmonic_mean_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [(0.8, 0.6, 0.96 / 1.4), (0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.25, 1.0, 0.4)],
)
def test_harmonic_mean_values(first, second, expected):
    assert harmonic_mean(first, second) == pytest.approx(expected)
    assert harmonic_mean(second, first) == pytest.approx(expected)


def test_log_round_scores_message(caplog):
    mean = {"accuracy": 0.5, "ece": 0.0625, "mce": 0.25, "ace": 0.04, "nll": 1.0}
    with caplog.at_level(logging.INFO, logger="fl2ora.runtime.scoring"):
        log_round_scores(4, mean)
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert caplog.records[0].getMessage() == "Round 4: client-mean accuracy 50.00%, ECE 6.25%, MCE 25.00%, ACE 4.00%"
