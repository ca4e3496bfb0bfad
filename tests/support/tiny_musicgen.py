"""Build a tiny, randomly initialised MusicGen on disk, so the real transformers code path runs offline.

The model keeps the real 32 kHz EnCodec geometry (hop 640, 50 frames per second) but tiny widths,
and saves with its processor, so ``from_pretrained(folder)`` loads it exactly as production loads
``facebook/musicgen-small``. Recipe and pitfalls: ``../shared/notes/musicgen.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Sentences the tokenizer is trained on; tests prompt with words from them.
PROMPTS = [
    "lofi hip hop beat with warm piano and vinyl crackle",
    "epic orchestral trailer music with drums and brass",
    "upbeat synthwave with driving bass at 120 bpm",
    "calm ambient pads in a minor, slow and dreamy",
    "funky disco groove with slap bass and strings",
    "dark techno with a heavy kick and acid lead",
]

# musicgen-small's geometry, for benchmarks on a GPU; the tiny defaults are for tests.
SMALL_DECODER = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "ffn_dim": 4096,
    "initializer_factor": 0.02,
}
SMALL_TEXT = {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12}
SMALL_CODEC = {
    "hidden_size": 128,
    "num_filters": 64,
    "codebook_size": 2048,
    "num_lstm_layers": 2,
    "use_causal_conv": False,
}


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(PROMPTS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tokenizer


def build_tiny_musicgen(
    path: Path,
    *,
    stereo: bool = False,
    decoder: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    codec: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Save a random MusicGen (mono, or stereo with 8 interleaved codebooks) and its processor to ``path``.

    ``decoder``, ``text_encoder`` and ``codec`` override the tiny sizes (see ``SMALL_*``).
    """
    import torch
    import transformers

    # Untyped on purpose: transformers 5 exports some of these lazily, invisible to type checkers.
    tf: Any = transformers
    tokenizer = tf.T5TokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )
    text_config = tf.T5Config(
        **{
            "vocab_size": len(tokenizer),
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
        }
        | (text_encoder or {})
    )
    codec_settings = {"hidden_size": 16, "num_filters": 4, "codebook_size": 64, "num_lstm_layers": 1} | (
        codec or {}
    )
    codebook_bits = (int(codec_settings["codebook_size"]) - 1).bit_length()
    # Enough quantizers for the decoder's 4 codebooks per channel: 1000*bw // (50 * bits) >= 4.
    bandwidth = 4 * 50 * codebook_bits / 1000
    codec_config = tf.EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,  # the stereo models decode left and right codebooks separately with a mono codec
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[bandwidth],
        norm_type="weight_norm",
        **codec_settings,
    )
    vocab = int(codec_settings["codebook_size"])
    decoder_config = tf.MusicgenDecoderConfig(
        # At the real init scale (0.02) a tiny decoder's logits are so flat that the prompt changes
        # no sampled token; a larger scale makes different prompts give different audio.
        **{
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "initializer_factor": 0.5,
        }
        | (decoder or {}),
        vocab_size=vocab,
        num_codebooks=8 if stereo else 4,
        audio_channels=2 if stereo else 1,
        pad_token_id=vocab,
        bos_token_id=vocab,
    )
    config = tf.MusicgenConfig(
        text_encoder=text_config.to_dict(),
        audio_encoder=codec_config.to_dict(),
        decoder=decoder_config.to_dict(),
    )
    torch.manual_seed(seed)
    model = tf.MusicgenForConditionalGeneration(config)
    # Random init leaves the codebooks at zero, and then every prompt decodes to the same audio.
    with torch.no_grad():
        for name, buffer in model.audio_encoder.named_buffers():
            if name.endswith("codebook.embed"):
                buffer.normal_()
    # The generation settings the official conversion ships: sampling with guidance 3.0, 30 s cap.
    model.generation_config.do_sample = True
    model.generation_config.guidance_scale = 3.0
    model.generation_config.max_length = 1500
    model.generation_config.pad_token_id = vocab
    model.generation_config.decoder_start_token_id = vocab

    feature_extractor = tf.EncodecFeatureExtractor(
        feature_size=2 if stereo else 1, sampling_rate=32000, padding_side="left"
    )
    processor = tf.MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
