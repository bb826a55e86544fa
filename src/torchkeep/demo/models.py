"""Small reference models for the demo, the tests and the benchmarks.

``LeNet5`` / ``LeNet6`` / ``LeNet5Moon`` are the seed articles' models for ``[n, 1, 28, 28]``
images: LeNet6 adds one Linear to LeNet5's ``fc`` (so LeNet5's last layer no longer fits), and
LeNet5Moon registers the same layers as one Sequential named ``moon``. ``TinyResNet`` and
``TinyBert`` / ``TinyBertClassifier`` use the module names of torchvision's ResNet and of
transformers' BERT, at sizes that run in milliseconds on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _lenet_conv(in_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),   # [n,6,14,14]
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2)]                      # [n,16,5,5]


class LeNet5(nn.Module):
    """LeNet5 as in the seed article: ``conv`` (2 convolutions) and ``fc`` (3 Linear layers)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_lenet_conv(in_channels))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                                nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(img))


class LeNet6(nn.Module):
    """LeNet5 with one more Linear at the end of ``fc``: ``fc.5`` becomes 84->64 and the new
    ``fc.7`` is the 64->classes head, so LeNet5's ``fc.5`` no longer fits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_lenet_conv(in_channels))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                                nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 64), nn.ReLU(),
                                nn.Linear(64, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(img))


class LeNet5Moon(nn.Module):
    """The seed's renamed LeNet5: the same layers in one Sequential ``moon``, so its names are
    ``moon.0`` / ``moon.3`` / ``moon.7`` / ``moon.9`` / ``moon.11`` and none matches LeNet5's."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.moon = nn.Sequential(*_lenet_conv(in_channels), nn.Flatten(),
                                  nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84),
                                  nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.moon(img)


# ------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """A ResNet with torchvision's names (conv1, bn1, layerN.i.*, fc), three stages."""

    def __init__(self, in_channels: int = 3, num_classes: int = 100,
                 widths: tuple[int, ...] = (8, 16, 32), blocks: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = w
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------- BERT
class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_position: int, type_vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_position, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        types = torch.zeros_like(ids) if token_types is None else token_types
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                             split(self.value(x)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, h)


class _DenseNorm(nn.Module):
    """BertSelfOutput / BertOutput: dense, dropout, residual LayerNorm."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        setattr(self, "self", _SelfAttention(hidden, heads))
        self.output = _DenseNorm(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(getattr(self, "self")(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = _Intermediate(hidden, intermediate)
        self.output = _DenseNorm(intermediate, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, intermediate) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class _Pooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class TinyBert(nn.Module):
    """A BERT encoder with transformers' parameter names (embeddings.*, encoder.layer.N.*, pooler.*)."""

    def __init__(self, vocab_size: int = 100, hidden: int = 32, layers: int = 2, heads: int = 2,
                 intermediate: int = 64, max_position: int = 64, type_vocab: int = 2) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not a multiple of heads={heads}")
        self.embeddings = _Embeddings(vocab_size, hidden, max_position, type_vocab)
        self.encoder = _Encoder(layers, hidden, heads, intermediate)
        self.pooler = _Pooler(hidden)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = None
        if attention_mask is not None:
            mask = (attention_mask[:, None, None, :] > 0)
        x = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
        return x, self.pooler(x)


class TinyBertClassifier(nn.Module):
    """TinyBert under ``bert.`` plus a ``classifier`` head, like BertForSequenceClassification."""

    def __init__(self, num_labels: int = 2, **bert_kwargs: int) -> None:
        super().__init__()
        self.bert = TinyBert(**bert_kwargs)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(self.bert.pooler.dense.out_features, num_labels)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(pooled))


__all__ = ["LeNet5", "LeNet6", "LeNet5Moon", "TinyResNet", "BasicBlock", "TinyBert",
           "TinyBertClassifier"]
