"""Test access to the PyTorch reference builders (they live in the package for `convert --verify`)."""
from clapjax.convert.torch_reference import (BART_BASE, BERT_BASE, ROBERTA_BASE, install_torchvision_stub,  # noqa: F401
                                             laion_clap, laion_clap_model, laion_model_cfg, offline_roberta,
                                             randomize_batch_norms, torch_state_dict)
