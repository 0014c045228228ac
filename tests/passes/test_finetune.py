import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.toolkit.train import distillation_loss
from tests.passes.helpers import run_pass


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def batches(x: torch.Tensor, size: int = 32) -> list[tuple[torch.Tensor]]:
    return [(x[i:i + size],) for i in range(0, len(x), size)]


def perturbed(teacher: Graph, scale: float = 0.6, seed: int = 1) -> Graph:
    student = teacher.copy()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.gm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return student


def agreement(a: Graph, b: Graph, x: torch.Tensor) -> float:
    return float((torch.from_numpy(a.run(x)[0]).argmax(1)
                  == torch.from_numpy(b.run(x)[0]).argmax(1)).float().mean())


@pytest.fixture(scope="module")
def teacher() -> Graph:
    return Graph.from_torch(tiny_cnn(), (data(1, 0),))


@pytest.mark.slow
def test_distillation_recovers_agreement_with_teacher(teacher):
    student = perturbed(teacher)
    am = PassContext(batches(data(1024, 1)), reference=teacher)
    held_out = data(512, 2)
    before = agreement(teacher, student, held_out)
    result = run_pass("finetune{epochs=15,lr=0.003,temperature=2,seed=0}", student, am)
    after = agreement(teacher, result.graph, held_out)
    assert result.changed and result.stats["mode"] == "distill"
    assert result.stats["samples"] == 1024 and result.stats["epochs"] == 15
    assert result.stats["loss_last"] < 0.5 * result.stats["loss_first"]
    assert before < 0.8
    assert after > before + 0.1 and after >= 0.85
    assert result.stats["teacher_top1_agreement_after"] > result.stats["teacher_top1_agreement_before"]


@pytest.mark.slow
def test_input_graph_unchanged_and_bn_statistics_frozen(teacher):
    student = perturbed(teacher)
    params = {k: v.clone() for k, v in student.gm.state_dict().items()}
    am = PassContext(batches(data(64, 1)), reference=teacher)
    result = run_pass("finetune{epochs=2}", student, am)
    for k, v in student.gm.state_dict().items():
        assert torch.equal(v, params[k]), k
    new = result.graph.gm.state_dict()
    bn = [k for k in new if "running_" in k]
    assert bn and all(torch.equal(new[k], params[k]) for k in bn)
    assert not torch.equal(new["0.weight"], params["0.weight"])
    assert not result.graph.gm.training


@pytest.mark.slow
def test_deterministic_with_seed(teacher):
    student = perturbed(teacher)
    am = PassContext(batches(data(96, 1)), reference=teacher)
    a = run_pass("finetune{epochs=2,seed=3}", student, am).graph.gm.state_dict()
    b = run_pass("finetune{epochs=2,seed=3}", student, am).graph.gm.state_dict()
    c = run_pass("finetune{epochs=2,seed=4}", student, am).graph.gm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_weight_masks_stay_applied(teacher):
    student = perturbed(teacher)
    fc = student.gm.get_submodule("5")
    mask = (torch.rand(fc.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        fc.weight.mul_(mask)
    fc.register_buffer("weight_mask", mask)
    am = PassContext(batches(data(128, 1)), reference=teacher)
    result = run_pass("finetune{epochs=3,lr=0.01}", student, am)
    new = result.graph.gm.get_submodule("5")
    assert torch.all(new.weight[mask == 0] == 0)
    assert not torch.equal(new.weight[mask == 1], fc.weight[mask == 1])
    assert result.stats["masked_layers"] == 1


@pytest.mark.slow
def test_supervised_and_auto_use_labels(teacher):
    x = data(128, 1)
    y = torch.from_numpy(teacher.run(x)[0]).argmax(1)
    label_batches = [y[i:i + 32] for i in range(0, 128, 32)]
    am = PassContext(batches(x), labels=label_batches, reference=teacher)
    student = perturbed(teacher)
    sup = run_pass("finetune{mode=supervised,epochs=5,optimizer=sgd,lr=0.05}", student, am)
    assert sup.changed and sup.stats["mode"] == "supervised"
    assert sup.stats["loss_last"] < sup.stats["loss_first"]
    auto = run_pass("finetune{epochs=1}", student, am)
    assert auto.stats["mode"] == "distill+ce"


def test_declines_without_user_calibration_data(teacher):
    student = perturbed(teacher)
    result = run_pass("finetune", student, PassContext(reference=teacher))
    assert not result.changed and result.graph is student
    assert "calibration" in result.skipped[0].reason


def test_declines_without_labels_teacher_or_trainable_params(teacher):
    student = perturbed(teacher)
    cal = batches(data(32, 1))
    no_labels = run_pass("finetune{mode=supervised}", student, PassContext(cal, reference=teacher))
    assert not no_labels.changed and "labels" in no_labels.skipped[0].reason
    no_teacher = run_pass("finetune", student, PassContext(cal))
    assert not no_teacher.changed and "teacher" in no_teacher.skipped[0].reason
    frozen = student.copy()
    for p in frozen.gm.parameters():
        p.requires_grad_(False)
    result = run_pass("finetune", frozen, PassContext(cal, reference=teacher))
    assert not result.changed and "trainable" in result.skipped[0].reason


def test_declines_a_graph_that_already_matches_its_teacher(teacher):
    """Distilling into a copy of the teacher has a zero loss: training would only add noise."""
    cal = batches(data(64, 1))
    result = run_pass("finetune", teacher.copy(), PassContext(cal, reference=teacher))
    assert not result.changed and "already reproduces its teacher" in result.skipped[0].reason
    # with labels (distill+ce) there is still something to learn: it trains
    labels = [torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(3)) for (x,) in cal]
    trained = run_pass("finetune{epochs=1}", teacher.copy(), PassContext(cal, labels=labels, reference=teacher))
    assert trained.changed and trained.stats["mode"] == "distill+ce"


def test_distillation_loss_is_zero_for_identical_logits_and_scaled_by_t2():
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(z, z, 3.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.log_softmax(z / 2, 1),
                                    log_target=True, reduction="batchmean")
    assert float(distillation_loss(s, z, 2.0)) == pytest.approx(4 * float(kl), rel=1e-5)


@pytest.mark.parametrize("spec", ["finetune{epochs=0}", "finetune{lr=-1}", "finetune{alpha=1.5}",
                                  "finetune{mode=teacher}", "finetune{optimizer=lbfgs}",
                                  "finetune{temperature=0}", "finetune{batch_size=0}"])
def test_config_errors(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)
