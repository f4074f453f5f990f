"""Checkpoint save/load: the reference format, atomic writes, clear errors."""
import pytest
import torch

import srns
import util


def test_round_trip_with_optimizer_and_extras(tmp_path):
    torch.manual_seed(0)
    model = srns.SRNsModel(3, 8, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.latent_codes.weight.sum().backward()
    optimizer.step()
    path = tmp_path / 'checkpoints' / 'epoch_0000_iter_000001.pth'
    util.save_checkpoint(path, model, optimizer, step=1, stage=0, config={'lr': 1e-3})
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind

    other = srns.SRNsModel(3, 8, 2)
    other_optimizer = torch.optim.Adam(other.parameters(), lr=1e-3)
    checkpoint = util.load_checkpoint(path.parent, other, other_optimizer)  # a folder: its last *.pth
    assert checkpoint['step'] == 1 and checkpoint['config'] == {'lr': 1e-3}
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])
    assert other_optimizer.state_dict()['state'][0]['step'] == 1


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = srns.SRNsModel(2, 8, 2)
    state = {'module.' + key: value for key, value in model.state_dict().items()}
    torch.save({'model': state}, tmp_path / 'ddp.pth')
    util.load_checkpoint(tmp_path / 'ddp.pth', srns.SRNsModel(2, 8, 2))


def test_wrong_number_of_instances_is_explained(tmp_path):
    util.save_checkpoint(tmp_path / 'a.pth', srns.SRNsModel(5, 8, 2))
    with pytest.raises(ValueError) as error:
        util.load_checkpoint(tmp_path / 'a.pth', srns.SRNsModel(3, 8, 2))
    message = str(error.value)
    assert str(tmp_path / 'a.pth') in message and 'latent_codes.weight' in message
    assert '5 latent codes' in message and '--overwrite_embeddings' in message


def test_overwrite_embeddings_keeps_new_codes(tmp_path):
    trained = srns.SRNsModel(5, 8, 2)
    util.save_checkpoint(tmp_path / 'a.pth', trained)
    fresh = srns.SRNsModel(2, 8, 2)
    codes = fresh.latent_codes.weight.detach().clone()
    util.load_checkpoint(tmp_path / 'a.pth', fresh, overwrite_embeddings=True)
    assert torch.equal(fresh.latent_codes.weight, codes)
    assert torch.equal(fresh.ray_marcher.lstm.weight_ih, trained.ray_marcher.lstm.weight_ih)


def test_model_of_another_kind_is_named(tmp_path):
    util.save_checkpoint(tmp_path / 'single.pth', srns.SRNsModel(1, 8, 2, fit_single_srn=True))
    with pytest.raises(ValueError, match='phi.net.0.net.0.weight'):
        util.load_checkpoint(tmp_path / 'single.pth', srns.SRNsModel(1, 8, 2))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        util.load_checkpoint(tmp_path / 'nope.pth', srns.SRNsModel(1, 8, 2))
    with pytest.raises(FileNotFoundError, match='no \\*.pth'):
        util.load_checkpoint(tmp_path, srns.SRNsModel(1, 8, 2))
    (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='bad.pth'):
        util.load_checkpoint(tmp_path / 'bad.pth', srns.SRNsModel(1, 8, 2))


def test_reference_checkpoint_loads_into_full_cars_model(reference_fixtures):
    checkpoint = util.read_checkpoint(reference_fixtures / 'hypernet' / 'checkpoint.pth')
    assert util.num_latent_codes(checkpoint) == 3
