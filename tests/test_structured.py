"""The structured dataset, the association metrics and the simplified model (CPU, seeded, a few seconds)."""
import pytest
import torch

from timm_posattn.association import adjusted_rand_index, association_metrics, kmeans, model_association
from timm_posattn.simplified import SimplifiedPositionalModel, logistic_loss, train_online
from timm_posattn.structured import (
    STRUCTURED_MEAN, STRUCTURED_STD, VALUE_RANGE, StructuredConfig, StructuredImageDataset,
    decode_image_to_patches, encode_patches_to_image, make_structure, orthogonal_feature, sample_structured,
)

pytestmark = pytest.mark.usefixtures('one_thread')


CFG = StructuredConfig(num_patches=16, num_sets=4, patch_dim=12, q=0.5, sigma=0.3, seed=3)


def _signal_sets(x, y, partition, feature):
    """Per sample, the sets whose every patch carries exactly y * w* (the signal set, possibly a lucky duplicate)."""
    coef = x @ feature  # noise is orthogonal to w*, so this is the coefficient delta_j (or y) exactly
    sets = []
    for n in range(len(x)):
        sets.append([s for s in partition.unique().tolist()
                     if torch.allclose(coef[n, partition == s], y[n].expand(int((partition == s).sum())), atol=1e-4)])
    return coef, sets


def test_partition_and_feature():
    partition, feature = make_structure(CFG)
    assert partition.shape == (16,) and partition.dtype == torch.long
    assert torch.bincount(partition).tolist() == [4, 4, 4, 4]
    assert feature.shape == (12,) and abs(float(feature.norm()) - 1) < 1e-6
    other = make_structure(StructuredConfig(num_patches=16, num_sets=4, patch_dim=12, seed=4))
    assert not torch.equal(partition, other[0])
    w2 = orthogonal_feature(feature, seed=1)
    assert abs(float(w2 @ feature)) < 1e-6 and abs(float(w2.norm()) - 1) < 1e-6


def test_sample_statistics():
    partition, feature = make_structure(CFG)
    x, y = sample_structured(CFG, 4000, seed=0)
    assert x.shape == (4000, 16, 12) and y.shape == (4000,)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert abs(float((y > 0).float().mean()) - 0.5) < 0.03  # label balance
    coef, sets = _signal_sets(x, y, partition, feature)
    assert all(len(s) >= 1 for s in sets)  # every sample has a set carrying y * w*
    # the signal set is uniform over the L sets (count samples whose only candidate is each set)
    unique_sets = torch.tensor([s[0] for s in sets if len(s) == 1])
    assert torch.bincount(unique_sets, minlength=4).min() > 0.2 * len(unique_sets)
    # delta frequencies on the patches outside the signal set: q/2, 1 - q, q/2
    outside = torch.cat([coef[n, partition != s[0]] for n, s in enumerate(sets) if len(s) == 1])
    for value, expected in ((-1.0, CFG.q / 2), (0.0, 1 - CFG.q), (1.0, CFG.q / 2)):
        freq = float((outside.round() == value).float().mean())
        assert abs(freq - expected) < 0.02, (value, freq)
    assert torch.allclose(outside, outside.round(), atol=1e-4)  # coefficients are exactly -1, 0, +1
    # noise: orthogonal to w*, scale sigma per coordinate in the (d-1)-dim complement
    noise = x - coef.unsqueeze(-1) * feature
    assert float((noise @ feature).abs().max()) < 1e-5
    per_coord_var = float(noise.pow(2).sum(-1).mean()) / (CFG.patch_dim - 1)
    assert abs(per_coord_var ** 0.5 - CFG.sigma) < 0.01


def test_sampling_is_seeded():
    a = sample_structured(CFG, 64, seed=5)
    b = sample_structured(CFG, 64, seed=5)
    c = sample_structured(CFG, 64, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_config_validation():
    with pytest.raises(ValueError, match='divide'):
        StructuredConfig(num_patches=10, num_sets=4)
    with pytest.raises(ValueError, match='q'):
        StructuredConfig(q=1.5)
    with pytest.raises(ValueError, match='partition of shape'):
        sample_structured(CFG, 4, seed=0, partition=torch.zeros(3, dtype=torch.long), feature=torch.ones(12))


def test_image_encoding_roundtrip_through_timm_transform():
    from timm.data import create_transform
    transform = create_transform(32, is_training=False, mean=STRUCTURED_MEAN, std=STRUCTURED_STD, crop_pct=1.0)
    ds = StructuredImageDataset('train', num_samples=8, seed=0, transform=transform)
    raw = StructuredImageDataset('train', num_samples=8, seed=0)
    partition, feature = make_structure(StructuredConfig(seed=0))
    x, y = sample_structured(StructuredConfig(seed=0), 8, seed=_split_seed(0, 'train'), partition=partition,
                             feature=feature)
    for i in range(8):
        image, label = ds[i]
        assert image.shape == (3, 32, 32) and label == int(y[i] > 0)
        decoded = decode_image_to_patches(image)
        inside = x[i].abs() <= VALUE_RANGE
        step = 2 * VALUE_RANGE / 255
        assert float((decoded - x[i])[inside].abs().max()) <= step / 2 + 1e-4  # 8-bit quantisation only
        assert raw[i][0].size == (32, 32) and raw[i][0].mode == 'RGB'
    # values beyond the range are clipped, not wrapped
    extreme = torch.full((64, 48), 10.0)
    assert (encode_patches_to_image(extreme) == 255).all()
    assert (encode_patches_to_image(-extreme) == 0).all()
    assert (encode_patches_to_image(x[:3]) == raw.images[:3]).all()  # batched encoding == per-sample
    with pytest.raises(ValueError, match='64, 48'):
        encode_patches_to_image(torch.zeros(63, 48))


def _split_seed(seed, split):
    from timm_posattn.structured import _split_seed as split_seed
    return split_seed(seed, split)


def test_splits_share_structure_and_differ_in_samples():
    train = StructuredImageDataset('train', num_samples=20, seed=1)
    val = StructuredImageDataset('val', num_samples=20, seed=1)
    assert val.split == 'validation' and len(train) == 20
    assert torch.equal(train.partition, val.partition) and torch.equal(train.feature, val.feature)
    assert not (train.images == val.images).all()
    again = StructuredImageDataset('train', num_samples=20, seed=1)
    assert (train.images == again.images).all() and train.targets == again.targets
    other = StructuredImageDataset('train', num_samples=20, seed=2)
    assert not torch.equal(train.partition, other.partition)
    assert len(StructuredImageDataset('validation')) == 1000
    with pytest.raises(ValueError, match='split'):
        StructuredImageDataset('holdout')


def test_timm_loader_batches():
    from timm.data import create_loader
    ds = StructuredImageDataset('validation', num_samples=12, seed=0)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=4, is_training=False, use_prefetcher=False,
                           mean=STRUCTURED_MEAN, std=STRUCTURED_STD, crop_pct=1.0, num_workers=0)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and targets.tolist() == ds.targets[:4]


# ---- metrics on hand-made attention matrices ----

PARTITION = torch.tensor([0, 1, 2, 3] * 4)  # 16 patches, 4 interleaved sets of 4


def _block_attention(target_of_set):
    """Row i spreads its mass evenly over the set target_of_set[set(i)]."""
    attn = torch.zeros(16, 16)
    for i in range(16):
        members = (PARTITION == target_of_set[int(PARTITION[i])]).float()
        attn[i] = members / members.sum()
    return attn


def test_metrics_block_diagonal():
    m = association_metrics(_block_attention([0, 1, 2, 3]), PARTITION)
    assert m['association'] == pytest.approx(1.0)
    assert m['set_purity'] == pytest.approx(1.0)
    assert m['partition_ari'] == pytest.approx(1.0)
    assert m['chance'] == pytest.approx(0.25) and m['chance_set_purity'] == pytest.approx(0.25)


def test_metrics_uniform_is_chance():
    m = association_metrics(torch.full((16, 16), 1 / 16), PARTITION)
    assert m['association'] == pytest.approx(0.25)
    assert m['set_purity'] == pytest.approx(0.25)
    assert m['partition_ari'] == pytest.approx(0.0, abs=1e-9)


def test_metrics_other_set():
    """Each row on another whole set: no own-set mass, full purity, and the columns still recover the sets."""
    m = association_metrics(_block_attention([1, 2, 3, 0]), PARTITION)
    assert m['association'] == pytest.approx(0.0)
    assert m['set_purity'] == pytest.approx(1.0)
    assert m['partition_ari'] == pytest.approx(1.0)


def test_metrics_identity():
    """Each patch only on itself: all its mass is in its own set, so association counts it; ARI sees no grouping."""
    m = association_metrics(torch.eye(16), PARTITION)
    assert m['association'] == pytest.approx(1.0)
    assert m['partition_ari'] < 0.5  # identity columns say nothing about which patches belong together


def test_metrics_bad_input():
    with pytest.raises(ValueError, match='square'):
        association_metrics(torch.ones(4, 5) / 5, torch.zeros(4))
    with pytest.raises(ValueError, match='partition of shape'):
        association_metrics(torch.eye(4), torch.zeros(5))
    with pytest.raises(ValueError, match='row-stochastic'):
        association_metrics(torch.ones(4, 4), torch.zeros(4))


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0)
    # hand-computed: index 2, expected 18/15, max 4.5 -> (2 - 1.2) / (4.5 - 1.2)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    with pytest.raises(ValueError, match='same length'):
        adjusted_rand_index([0, 1], [0])


def test_kmeans_separates_clusters():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(10, 3, generator=g) * 0.1 + c for c in (0.0, 5.0, -5.0)]).numpy()
    labels = kmeans(points, 3, seed=0)
    assert adjusted_rand_index([0] * 10 + [1] * 10 + [2] * 10, labels) == pytest.approx(1.0)


class _FakePosAttnModel(torch.nn.Module):
    """Stands in for a vit_posattn_* model: two blocks, two heads, class token first."""
    num_prefix_tokens = 1
    pos_attn_indices = [0, 1]

    def __init__(self, patch_attn):
        super().__init__()
        n = patch_attn.shape[0] + 1
        full = torch.zeros(n, n)
        full[1:, 1:] = patch_attn * 0.5  # half the mass of every patch row goes to the class token
        full[1:, 0] = 0.5
        full[0] = 1 / n
        self.maps = torch.stack([torch.stack([full, full]), torch.stack([full, torch.eye(n)])])

    def get_attention_maps(self, img_size=None):
        return self.maps


def test_model_association_drops_class_token_and_averages():
    model = _FakePosAttnModel(_block_attention([0, 1, 2, 3]))
    m = model_association(model, PARTITION)
    # three heads put all patch mass on the own set, the identity head too -> association 1 after renormalising
    assert m['association'] == pytest.approx(1.0)
    assert m['partition_ari'] == pytest.approx(1.0)
    assert m['best_head_association'] == pytest.approx(1.0)
    uniform = _FakePosAttnModel(torch.full((16, 16), 1 / 16))
    uniform.maps[1, 1] = uniform.maps[0, 0]
    assert model_association(uniform, PARTITION)['association'] == pytest.approx(0.25)
    only_identity_head = model_association(model, PARTITION, blocks=[1])
    assert only_identity_head['best_head'] == [1, 0]
    with pytest.raises(ValueError, match='not positional-attention blocks'):
        model_association(model, PARTITION, blocks=[2])
    with pytest.raises(ValueError, match='partition has'):
        model_association(model, torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match='get_attention_maps'):
        model_association(torch.nn.Linear(2, 2), PARTITION)


# ---- the simplified model ----

def test_uniform_attention_is_a_fixed_point():
    """Exactly uniform logits: every row gets the same gradient, so the attention stays uniform."""
    model = SimplifiedPositionalModel(16, 12, num_neurons=4, attention='logits', init='random', seed=0)
    with torch.no_grad():
        model.attn.table.zero_()
    x, y = sample_structured(CFG, 256, seed=0)
    logistic_loss(model(x), y).backward()
    grad = model.attn.table.grad[0]
    assert float(grad.abs().max()) > 0
    assert torch.allclose(grad, grad[0].expand_as(grad), atol=1e-6)
    # equal rows of the logit gradient shift every row's softmax the same way: rows of A remain identical
    with torch.no_grad():
        model.attn.table[0] -= 10.0 * grad
    attn = model.attention()
    assert torch.allclose(attn, attn[0].expand_as(attn), atol=1e-6)


@pytest.mark.parametrize('attention', ['logits', 'qk', 'tied'])
def test_simplified_model_shapes_and_errors(attention):
    model = SimplifiedPositionalModel(16, 12, attention=attention, init='local', beta=2.0)
    assert torch.allclose(model.attention().sum(-1), torch.ones(16))
    assert model.attention().diagonal().mean() > 0.2  # local init: each patch first prefers itself
    assert (model.pos is None) == (attention == 'logits')  # only layers that read a positional table get one
    again = SimplifiedPositionalModel(16, 12, attention=attention, init='local', beta=2.0)
    torch.testing.assert_close(again.attention(), model.attention(), rtol=0, atol=0)  # seeded
    with pytest.raises(ValueError, match='expected inputs'):
        model(torch.zeros(2, 15, 12))
    with pytest.raises(ValueError, match='init'):
        SimplifiedPositionalModel(16, 12, init='zeros')
    with pytest.raises(ValueError, match=r"expected attention in \[.*'tied'\], got 'free'"):
        SimplifiedPositionalModel(16, 12, attention='free')


def test_local_init_training_learns_association():
    torch.manual_seed(0)
    model = SimplifiedPositionalModel(16, 12, num_neurons=4, attention='logits', init='local', seed=0)
    history = train_online(model, CFG, steps=250, batch_size=128, lr=0.02, seed=0, eval_every=250)
    final = history[-1]
    assert final['association'] > 2 * final['chance']
    assert final['partition_ari'] > 0.9
    assert history[0]['association'] < final['association']
