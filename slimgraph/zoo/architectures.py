"""Classic CNN architectures, shrunk, written out the way torchvision writes them.

Each class keeps its paper's block structure (fire modules, depthwise-separable and inverted
residual blocks, squeeze-excitation, channel split and shuffle, group convolutions, inception
branches, dense concatenation, bottlenecks, ConvNeXt's NHWC LayerNorm and layer scale) but with
narrow widths and few blocks, so that a batch-1 forward pass takes milliseconds. The defaults of
each class *are* the shrunk configuration; the docstrings give the paper's full-size one.

``ZOO`` maps a name to a factory returning ``(module_in_eval_mode, example_inputs)``. Weights are
drawn from a local ``torch.Generator`` (the caller's global RNG is neither read nor advanced):
Kaiming-normal convolutions and linear layers, random batch-norm running statistics and affine
parameters, random LayerNorm affine parameters and ConvNeXt layer scales (folding batch norm is
never a no-op), then each conv / linear layer rescaled to unit output RMS on the example input
(``normalize_scales_``) so activations stay near 1 through every net. The weights are random:
these models are for structure, numerics and latency, never for accuracy claims.

Imports here are absolute, so that ``slimgraph/zoo/architectures.py:resnet50_factory`` also
works as a ``file.py:factory`` model spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.errors import ModelLoadError

NUM_CLASSES = 10
"""Every zoo model ends in a ``(batch, NUM_CLASSES)`` logits tensor."""

ZooEntry = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` (MobileNet / EfficientNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type[nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation (Hu et al. 2018): global pool -> 1x1 reduce -> 1x1 expand -> gate."""

    def __init__(self, channels: int, squeeze: int, activation: type[nn.Module] = nn.ReLU,
                 scale_activation: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """Drops a residual branch per sample in training (Huang et al. 2016); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(survival).div_(survival)


# --------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then concatenated 1x1 and 3x3 expands."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (Iandola et al. 2016) at 1/4 width (stem 16, not 64). No batch norm."""

    def __init__(self, num_classes: int = NUM_CLASSES, w: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(w, w // 4, w, w), Fire(2 * w, w // 4, w, w),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(2 * w, w // 2, 2 * w, 2 * w), Fire(4 * w, w // 2, 2 * w, 2 * w),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(4 * w, 3 * w // 4, 3 * w, 3 * w), Fire(6 * w, 3 * w // 4, 3 * w, 3 * w),
            Fire(6 * w, w, 4 * w, 4 * w), Fire(8 * w, w, 4 * w, 4 * w),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(8 * w, num_classes, 1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- MobileNet v1


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017) at width 0.25, with 2 of the 5 middle 512-channel blocks.

    Each block is depthwise 3x3 conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU.
    """

    # (out_channels, stride) of the depthwise-separable blocks at width 1.0
    CFG: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                                        (512, 2), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 0.25):
        super().__init__()
        cin = int(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2)]
        for cout, stride in self.CFG:
            cout = int(cout * width_mult)
            layers += [ConvBNAct(cin, cin, 3, stride, groups=cin), ConvBNAct(cin, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- MobileNet v2


class InvertedResidual(nn.Module):
    """MobileNet v2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNet v2 (Sandler et al. 2018) at width 0.25, each stage at most 2 blocks deep."""

    # (expand t, channels c, repeats n, stride s) at width 1.0, as in the paper's table 2
    CFG: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
        (6, 160, 3, 2), (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 0.25,
                 max_repeats: int = 2, last_channel: int = 256):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in self.CFG:
            cout = _make_divisible(c * width_mult)
            for i in range(min(n, max_repeats)):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- MobileNet v3


class InvertedResidualV3(nn.Module):
    """MobileNet v3 block: expand, depthwise, optional hard-sigmoid SE, linear projection."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool,
                 activation: type[nn.Module], stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=activation))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded,
                                activation=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class MobileNetV3(nn.Module):
    """MobileNet v3-Small (Howard et al. 2019) at width 0.5, 7 of its 11 bneck blocks."""

    RE, HS = nn.ReLU, nn.Hardswish
    # (in, kernel, expanded, out, use_se, activation, stride) at width 1.0
    CFG = ((16, 3, 16, 16, True, RE, 2), (16, 3, 72, 24, False, RE, 2),
           (24, 3, 88, 24, False, RE, 1), (24, 5, 96, 40, True, HS, 2),
           (40, 5, 240, 40, True, HS, 1), (40, 5, 120, 48, True, HS, 1),
           (48, 5, 288, 96, True, HS, 2))

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 0.5,
                 last_channel: int = 256):
        super().__init__()

        def adjust(c: int) -> int:
            return _make_divisible(c * width_mult)

        layers: list[nn.Module] = [ConvBNAct(3, adjust(16), 3, 2, activation=nn.Hardswish)]
        for cin, k, exp, cout, se, act, s in self.CFG:
            layers.append(InvertedResidualV3(adjust(cin), k, adjust(exp), adjust(cout), se, act, s))
        last_conv = 6 * adjust(self.CFG[-1][3])
        layers.append(ConvBNAct(adjust(self.CFG[-1][3]), last_conv, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True), nn.Dropout(0.2),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- ShuffleNet v2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups: view, transpose, contiguous, view back."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNet v2 unit: split channels (stride 1) or branch twice (stride 2), concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvBNAct(cin, cin, 3, stride, groups=cin, activation=None),
                ConvBNAct(cin, branch, 1),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            ConvBNAct(cin if stride > 1 else branch, branch, 1),
            ConvBNAct(branch, branch, 3, stride, groups=branch, activation=None),
            ConvBNAct(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 (Ma et al. 2018), narrower than x0.5 and 2 units per stage (paper: 4, 8, 4)."""

    def __init__(self, num_classes: int = NUM_CLASSES,
                 stages_repeats: Sequence[int] = (2, 2, 2),
                 stages_out_channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        cin = stages_out_channels[0]
        self.conv1 = ConvBNAct(3, cin, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for repeats, cout in zip(stages_repeats, stages_out_channels[1:4], strict=True):
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1)
                                                  for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = ConvBNAct(cin, stages_out_channels[-1], 1)
        self.fc = nn.Linear(stages_out_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


# --------------------------------------------------------------------------- EfficientNet-B0


class MBConv(nn.Module):
    """EfficientNet MBConv: expand (SiLU), depthwise (SiLU), SE, linear projection, drop path."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int,
                 stochastic_depth_prob: float):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _make_divisible(cin * expand_ratio)
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, activation=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU),
            ConvBNAct(hidden, cout, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class EfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019) at width 0.25 and depth 0.5 (ceil), head 1280 -> 256."""

    # (expand, kernel, stride, in, out, layers) at width and depth 1.0
    CFG = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
           (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
           (6, 3, 1, 192, 320, 1))

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 0.25,
                 depth_mult: float = 0.5, last_channel: int = 256,
                 stochastic_depth_prob: float = 0.2):
        super().__init__()
        plan = [(e, k, s, _make_divisible(i * width_mult), _make_divisible(o * width_mult),
                 math.ceil(n * depth_mult)) for e, k, s, i, o, n in self.CFG]
        total = sum(p[-1] for p in plan)
        layers: list[nn.Module] = [ConvBNAct(3, plan[0][3], 3, 2, activation=nn.SiLU)]
        block_id = 0
        for expand, k, stride, cin, cout, n in plan:
            stage = []
            for i in range(n):
                sd_prob = stochastic_depth_prob * block_id / total
                stage.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1,
                                    expand, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        layers.append(ConvBNAct(plan[-1][4], last_channel, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True),
                                        nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- MnasNet


class MnasBlock(nn.Module):
    """MnasNet inverted residual: 1x1 expand, kxk depthwise, linear 1x1 (ReLU, no SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x if self.apply_residual else self.layers(x)


def _mnas_stack(cin: int, cout: int, kernel: int, stride: int, expansion: int,
                repeats: int) -> nn.Sequential:
    blocks = [MnasBlock(cin, cout, kernel, stride, expansion)]
    blocks += [MnasBlock(cout, cout, kernel, 1, expansion) for _ in range(repeats - 1)]
    return nn.Sequential(*blocks)


class MNASNet(nn.Module):
    """MnasNet-A1 without SE, i.e. torchvision's MNASNet (Tan et al. 2019), at alpha 0.35.

    Stacks are at most 2 blocks deep (paper: 3, 3, 3, 2, 4, 1); the head is 1280 -> 256.
    """

    # (kernel, stride, expansion, repeats) of the six stacks
    CFG = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
    DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)

    def __init__(self, num_classes: int = NUM_CLASSES, alpha: float = 0.35, max_repeats: int = 2,
                 last_channel: int = 256):
        super().__init__()
        d = [_make_divisible(c * alpha, 8) for c in self.DEPTHS]
        layers: list[nn.Module] = [
            nn.Conv2d(3, d[0], 3, 2, 1, bias=False), nn.BatchNorm2d(d[0]), nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[0], 3, 1, 1, groups=d[0], bias=False), nn.BatchNorm2d(d[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[1], 1, bias=False), nn.BatchNorm2d(d[1]),
        ]
        for i, (k, s, e, n) in enumerate(self.CFG):
            layers.append(_mnas_stack(d[i + 1], d[i + 2], k, s, e, min(n, max_repeats)))
        layers += [nn.Conv2d(d[-1], last_channel, 1, bias=False), nn.BatchNorm2d(last_channel),
                   nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True),
                                        nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))


# --------------------------------------------------------------------------- RegNet


class ResBottleneckBlock(nn.Module):
    """RegNet X block: 1x1, 3x3 group conv (stride), 1x1 linear, residual, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int):
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = ConvBNAct(cin, cout, 1, stride, activation=None)
        self.f = nn.Sequential(
            ConvBNAct(cin, cout, 1),
            ConvBNAct(cout, cout, 3, stride, groups=cout // group_width),
            ConvBNAct(cout, cout, 1, activation=None),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """RegNetX (Radosavovic et al. 2020), 200MF-like: group width 8, bottleneck ratio 1.

    Full RegNetX-200MF: stem 32, depths (1, 1, 4, 7), widths (24, 56, 152, 368).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, stem_width: int = 16,
                 depths: Sequence[int] = (1, 1, 2, 2), widths: Sequence[int] = (16, 32, 64, 128),
                 group_width: int = 8):
        super().__init__()
        self.stem = ConvBNAct(3, stem_width, 3, 2)
        cin, stages = stem_width, []
        for depth, width in zip(depths, widths, strict=True):
            blocks = [ResBottleneckBlock(cin if i == 0 else width, width, 2 if i == 0 else 1,
                                         group_width) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.trunk_output = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- GoogLeNet


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BN (eps 1e-3) -> ReLU, as in torchvision's Inception models."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Inception v1 module: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 maxpool->1x1, concatenated."""

    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, 1),
                                     BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, 1),
                                     BasicConv2d(ch5x5red, ch5x5, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """GoogLeNet auxiliary classifier; only runs in training mode."""

    def __init__(self, cin: int, num_classes: int, width: int = 32, hidden: int = 128):
        super().__init__()
        self.conv = BasicConv2d(cin, width, 1)
        self.fc1 = nn.Linear(width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1)), inplace=True))
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015) at 1/4 width with inception 3a, 3b, 4a, 4b and 5a.

    The auxiliary heads exist (their parameters count) but only run in training mode, where the
    forward returns ``(logits, aux2, aux1)``; in eval it returns the logits alone. The third
    branch is a real 5x5 as in the paper (torchvision's is 3x3, a bug kept for its weights).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, aux_logits: bool = True):
        super().__init__()
        self.conv1 = BasicConv2d(3, 16, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(16, 16, 1)
        self.conv3 = BasicConv2d(16, 48, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(48, 16, 24, 32, 4, 8, 8)        # -> 64
        self.inception3b = Inception(64, 32, 32, 48, 8, 24, 16)      # -> 120
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(120, 48, 24, 52, 4, 12, 16)     # -> 128
        self.inception4b = Inception(128, 40, 28, 56, 6, 16, 16)     # -> 128
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(128, 64, 40, 80, 8, 32, 32)     # -> 208
        self.aux1 = InceptionAux(128, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(128, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(208, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4b(x)
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception5a(self.maxpool4(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and aux1 is not None:
            return x, aux2, aux1
        return x


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * growth) -> BN-ReLU-3x3 conv (growth) over concatenated inputs."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate else x


class DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, cin: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth_rate, growth_rate,
                                                             bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (halve channels) -> 2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with growth 12, blocks (2, 3, 4, 3), 24 initial features.

    DenseNet-121: growth 32, blocks (6, 12, 24, 16), 64 initial features.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, growth_rate: int = 12,
                 block_config: Sequence[int] = (2, 3, 4, 3), num_init_features: int = 24,
                 bn_size: int = 4):
        super().__init__()
        layers: dict[str, nn.Module] = {
            "conv0": nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False),
            "norm0": nn.BatchNorm2d(num_init_features),
            "relu0": nn.ReLU(inplace=True),
            "pool0": nn.MaxPool2d(3, 2, 1),
        }
        c = num_init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, c, bn_size, growth_rate)
            c += num_layers * growth_rate
            if i != len(block_config) - 1:
                layers[f"transition{i + 1}"] = Transition(c, c // 2)
                c //= 2
        layers["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential()
        for name, layer in layers.items():
            self.features.add_module(name, layer)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (4x planes), projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016) at width 8 (paper: 64) with (2, 2, 2, 1) bottleneck blocks.

    ResNet-50: stages of (3, 4, 6, 3) blocks.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, layers: Sequence[int] = (2, 2, 2, 1),
                 width: int = 8):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    """``torch.permute`` as a module (torchvision.ops.misc.Permute)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, by permuting to NHWC and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise, NHWC LayerNorm, Linear 4x, GELU, Linear, layer scale."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        return self.stochastic_depth(result) + x


class ConvNeXt(nn.Module):
    """ConvNeXt-T (Liu et al. 2022) at 1/6 width: dims (16, 32, 64, 128), depths (1, 1, 2, 1).

    ConvNeXt-T: dims (96, 192, 384, 768), depths (3, 3, 9, 3).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dims: Sequence[int] = (16, 32, 64, 128),
                 depths: Sequence[int] = (1, 1, 2, 1), layer_scale: float = 1e-6,
                 stochastic_depth_prob: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4),
                                                 LayerNorm2d(dims[0], eps=1e-6))]
        total, block_id = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            stage = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * block_id / max(total - 1.0, 1.0)
                stage.append(CNBlock(dim, layer_scale, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6),
                                            nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------- AlexNet, VGG


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012; torchvision's one-tower layout) at 1/4 width, no BN.

    At 3x64x64 the features end at 1x1, so the adaptive pool is (1, 1) (torchvision: (6, 6) at
    224x224) and the classifier's hidden width is 256 (paper: 4096).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 48, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(64, hidden), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG(nn.Module):
    """VGG-11 with batch norm (Simonyan & Zisserman 2015, config A) at 1/8 width.

    At 3x64x64 the features end at 2x2 and the pool keeps them, so the classifier flattens
    C x 2 x 2 (torchvision: 512 x 7 x 7 -> 4096 -> 4096); hidden width 128.
    """

    CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = NUM_CLASSES, width_div: int = 8, hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = int(v) // width_div
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 2 * 2, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- weights, registry


def _kaiming(w: torch.Tensor, gen: torch.Generator) -> None:
    fan_in = w[0].numel()
    w.copy_(torch.randn(w.shape, generator=gen) * math.sqrt(2.0 / fan_in))


def _init_affine(m: nn.Module, gen: torch.Generator) -> None:
    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _init_conv_or_linear(m: nn.Module, gen: torch.Generator) -> None:
    _kaiming(m.weight, gen)
    if m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)


def _init_bn(m: nn.Module, gen: torch.Generator) -> None:
    _init_affine(m, gen)
    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _init_layer_scale(m: nn.Module, gen: torch.Generator) -> None:
    # torchvision starts at 1e-6, which makes every block an identity; draw U(0.1, 0.5).
    m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=gen) * 0.4 + 0.1)


_INITS: tuple[tuple[type[nn.Module], Callable[[nn.Module, torch.Generator], None]], ...] = (
    (nn.Conv2d, _init_conv_or_linear),
    (nn.Linear, _init_conv_or_linear),
    (nn.BatchNorm2d, _init_bn),
    (nn.LayerNorm, _init_affine),
    (CNBlock, _init_layer_scale),
)


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Draw every parameter and float buffer of ``model`` from ``gen``; return ``model``.

    Raises ``TypeError`` naming any parameter no rule covers, so a new layer type cannot
    silently keep torch's default (global-RNG) initialization.
    """
    done: set[int] = set()
    for module in model.modules():
        for kind, init in _INITS:
            if isinstance(module, kind):
                init(module, gen)
                done.update(id(t) for t in module.parameters(recurse=False))
                done.update(id(t) for t in module.buffers(recurse=False))
    missed = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
              if t.is_floating_point() and id(t) not in done]
    if missed:
        raise TypeError(f"no initialization rule for {', '.join(missed)}")
    return model


@torch.no_grad()
def normalize_scales_(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """Rescale each conv / linear layer so its output has unit RMS on ``inputs`` (LSUV-style).

    Kaiming init alone lets activations grow about 1.8x per block here (gain sqrt(2) before
    linear bottlenecks and depthwise convs without a ReLU, random batch-norm statistics), to
    ~300 at the logits of a 13-block net. One eval-mode forward pass fixes that: a hook scales
    each layer's weight and bias and hands the rescaled output on, so every later layer is
    measured on already-normalized activations. Layers that do not run in eval (GoogLeNet's
    auxiliary heads) keep their Kaiming weights.
    """
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        rms = out.pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms == 0:
            return out
        module.weight.div_(rms)
        if module.bias is not None:
            module.bias.div_(rms)
        return out / rms

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        model.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()
    return model


def _build(cls: Callable[[], nn.Module], size: int, seed: int) -> ZooEntry:
    """Construct ``cls()`` without touching the global RNG, randomize it, draw a 1x3xSxS input."""
    with torch.random.fork_rng(devices=[]):
        model = cls()
    gen = torch.Generator().manual_seed(seed)
    randomize_(model, gen)
    x = torch.randn(1, 3, size, size, generator=gen)
    normalize_scales_(model, (x,))
    return model.eval(), (x,)


def squeezenet_factory(seed: int = 0) -> ZooEntry:
    """SqueezeNet 1.1 at 3x64x64: fire modules (1x1 and 3x3 expands concatenated), no BN."""
    return _build(SqueezeNet, 64, seed)


def mobilenet_v1_factory(seed: int = 0) -> ZooEntry:
    """MobileNet v1 at 3x64x64: depthwise-separable conv-BN-ReLU blocks."""
    return _build(MobileNetV1, 64, seed)


def mobilenet_v2_factory(seed: int = 0) -> ZooEntry:
    """MobileNet v2 at 3x64x64: inverted residuals, ReLU6, linear bottlenecks."""
    return _build(MobileNetV2, 64, seed)


def mobilenet_v3_factory(seed: int = 0) -> ZooEntry:
    """MobileNet v3-Small at 3x64x64: hard-swish, hard-sigmoid squeeze-excitation."""
    return _build(MobileNetV3, 64, seed)


def shufflenet_v2_factory(seed: int = 0) -> ZooEntry:
    """ShuffleNet v2 at 3x64x64: chunk channel split, view/transpose channel shuffle, concat."""
    return _build(ShuffleNetV2, 64, seed)


def efficientnet_b0_factory(seed: int = 0) -> ZooEntry:
    """EfficientNet-B0 at 3x64x64: MBConv, SiLU, SE, stochastic depth (identity in eval)."""
    return _build(EfficientNet, 64, seed)


def mnasnet_factory(seed: int = 0) -> ZooEntry:
    """MnasNet at 3x64x64: 3x3 and 5x5 inverted residual stacks, mean-pooled head."""
    return _build(MNASNet, 64, seed)


def regnet_x_factory(seed: int = 0) -> ZooEntry:
    """RegNetX at 3x64x64: X blocks with group width 8."""
    return _build(RegNet, 64, seed)


def googlenet_factory(seed: int = 0) -> ZooEntry:
    """GoogLeNet at 3x64x64: 4-branch inception concat; aux heads present but off in eval."""
    return _build(GoogLeNet, 64, seed)


def densenet_factory(seed: int = 0) -> ZooEntry:
    """DenseNet-BC at 3x64x64: dense blocks (concatenation), transitions."""
    return _build(DenseNet, 64, seed)


def resnet50_factory(seed: int = 0) -> ZooEntry:
    """ResNet-50 layout at 3x64x64: bottleneck blocks, projection shortcuts."""
    return _build(ResNet50, 64, seed)


def convnext_factory(seed: int = 0) -> ZooEntry:
    """ConvNeXt-T layout at 3x64x64: 7x7 depthwise, NHWC LayerNorm and Linear, layer scale, GELU."""
    return _build(ConvNeXt, 64, seed)


def alexnet_factory(seed: int = 0) -> ZooEntry:
    """AlexNet at 3x64x64: large-kernel convs, ReLU, max pools, dropout MLP; no BN."""
    return _build(AlexNet, 64, seed)


def vgg_bn_factory(seed: int = 0) -> ZooEntry:
    """VGG-11-BN at 3x64x64: 3x3 conv-BN-ReLU stacks, max pools, flatten of C x 2 x 2, MLP."""
    return _build(VGG, 64, seed)


ZOO: dict[str, Callable[[], ZooEntry]] = {
    "squeezenet": squeezenet_factory,
    "mobilenet_v1": mobilenet_v1_factory,
    "mobilenet_v2": mobilenet_v2_factory,
    "mobilenet_v3": mobilenet_v3_factory,
    "shufflenet_v2": shufflenet_v2_factory,
    "efficientnet_b0": efficientnet_b0_factory,
    "mnasnet": mnasnet_factory,
    "regnet_x": regnet_x_factory,
    "googlenet": googlenet_factory,
    "densenet": densenet_factory,
    "resnet50": resnet50_factory,
    "convnext": convnext_factory,
    "alexnet": alexnet_factory,
    "vgg_bn": vgg_bn_factory,
}
"""Name -> factory returning ``(module_in_eval_mode, example_inputs)``."""


def zoo_factory(name: str) -> ZooEntry:
    """``(module_in_eval_mode, example_inputs)`` for a ``ZOO`` name, as ``file.py:factory`` gives.

    Raises ``ModelLoadError`` listing the known names when ``name`` is not one of them.
    """
    factory = ZOO.get(name)
    if factory is None:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return factory()
