"""`make demo`: what runs end to end today (the training demo replaces this in issue 6).

Trains a byte-level BPE on a few captions, builds a small RoBERTa text tower, round-trips its
weights through the strict key table (printing the report), and embeds the captions.
"""
from __future__ import annotations

import tempfile

import numpy as np
from flax import nnx

from clapjax import text as T
from clapjax.convert import keymap as K
from clapjax.convert import text_keys
from clapjax.heads import l2_normalize
from clapjax.tokenizer import Tokenizer, train_byte_level_bpe

CAPTIONS = ["a dog barks loudly", "a bell rings softly", "rain falls on a roof", "a car horn beeps twice"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(train_byte_level_bpe(CAPTIONS * 50, tmp, vocab_size=300))
        cfg = T.BertConfig.roberta_base(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=256)
        tower = T.text_tower("roberta", cfg, nnx.Rngs(0))
        table = text_keys.tower_table(tower)
        state_dict = K.export_state_dict(tower, table)
        print(f"exported {len(state_dict)} tensors in the transformers RobertaModel layout; reloading strictly:")
        print(K.load_state_dict(tower, state_dict, table).summary())
        batch = tok(CAPTIONS)
        emb = np.asarray(l2_normalize(tower(batch["input_ids"], batch["attention_mask"]).pooled))
        print("\ncosine similarity of the (random-init) text embeddings:")
        for caption, row in zip(CAPTIONS, emb @ emb.T):
            print(f"  {caption:<24}" + " ".join(f"{x:6.3f}" for x in row))


if __name__ == "__main__":
    main()
