"""Tiny random Qwen2-Audio models and a tiny byte-level BPE tokenizer: the production classes at toy size."""
import torch


def tiny_qwen2audio_model(layers: int = 3, seed: int = 0):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    config = Qwen2AudioConfig(
        # max_source_positions must stay 1500: 30 s = 3000 mel frames, what the HF tower insists on
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=32, encoder_layers=layers,
                          encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
        audio_token_index=511)
    torch.manual_seed(seed)
    return Qwen2AudioForConditionalGeneration(config).eval()


def tiny_bpe_tokenizer(corpus=("the term nintendo is in the glossary", "quick brown fox")):
    """A byte-level BPE like Qwen2's, trained in milliseconds on a few words (no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(corpus) * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
