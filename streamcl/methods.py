"""Named recipes: a method name -> the plugin list that makes it (``[method] name = "..."`` in a config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from streamcl.errors import ConfigError
from streamcl.registry import build_plugin, check_arguments


@dataclass(frozen=True)
class Recipe:
    """``plugins(**kwargs)`` builds the list; ``offline`` recipes train once on the joined stream."""

    name: str
    summary: str
    plugins: Callable[..., list]
    offline: bool = False


def _icarl(memory, loss: str, join: bool = True) -> list:
    """iCaRL's plugins; ``loss="bce"`` the paper's sigmoid classification loss, ``"ce"`` the engine's cross-entropy;
    ``join``: the exemplars joined to the new data (Alg. 3's training set), else replayed beside every minibatch."""
    if loss not in ("bce", "ce"):
        raise ConfigError(f"icarl loss={loss!r}: use \"bce\" (the paper's sigmoid binary cross-entropy) or \"ce\" "
                          "(softmax cross-entropy over every output)")
    return [build_plugin("replay", memory=memory, selection="herding", join=join),
            *([build_plugin("sigmoid_bce")] if loss == "bce" else []),
            build_plugin("distill", kind="bce"), build_plugin("nme")]


def _distill_on(recipe: str, value) -> bool:
    """``distill_on="all"`` (every sample of the minibatch, as the paper) -> True; ``"new"`` (the experience's
    own samples) -> False."""
    if value not in ("all", "new"):
        raise ConfigError(f"{recipe} distill_on={value!r}: use \"all\" (new samples and exemplars, as the paper) or "
                          "\"new\" (the experience's own samples only)")
    return value == "all"


def _bic_distill(value) -> str:
    if value not in ("bic", "lwf"):
        raise ConfigError(f"bic distill={value!r}: use \"bic\" (the paper's loss, eq. 1-3) or \"lwf\" (LwF's "
                          "distillation of the experience's own samples, uncorrected logits, unweighted cross-entropy)")
    return value


def _bic(memory: int, ratio: float = 0.1, distill: str = "bic", weighting: str = "relative", weight: float = 1.0):
    return [build_plugin("replay", memory=memory),
            *([build_plugin("lwf", weight=weight)] if _bic_distill(distill) == "lwf" else []),
            build_plugin("bias_correction", ratio=ratio, distill=distill == "bic", weighting=weighting)]


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("naive", "fine-tune on each experience in turn, nothing against forgetting (lower bound)", lambda: []),
    Recipe("cumulative", "each experience trained with all earlier data (unbounded rehearsal)",
           lambda: [build_plugin("cumulative")]),
    Recipe("joint", "one offline training on the whole stream joined (upper bound)", lambda: [], offline=True),
    Recipe("replay", "experience replay: a class-balanced memory replayed beside every minibatch (ER)",
           lambda memory=500, **options: [build_plugin("replay", memory=memory, **options)]),  # any Replay argument
    Recipe("replay_la", "experience replay on the logit-adjusted loss (the softmax offset by the log frequencies of "
           "the trained rows, so the rare old classes are not pushed down) with 64 replayed samples a step; streamcl's "
           "lift", lambda memory=500, batch_size=64, tau=1.0: [
               build_plugin("replay", memory=memory, batch_size=batch_size), build_plugin("logit_adjustment", tau=tau)]),
    Recipe("derpp", "dark experience replay++: a reservoir memory of samples and logits; logit matching + replayed labels",
           lambda memory=500, alpha=1.0, beta=0.5: [build_plugin("dark_replay", memory=memory, alpha=alpha, beta=beta)]),
    Recipe("er_ace", "experience replay with the asymmetric cross-entropy (incoming samples over their own classes)",
           lambda memory=500: [build_plugin("replay", memory=memory, selection="reservoir"), build_plugin("er_ace")]),
    Recipe("icarl", "iCaRL: herding exemplars, sigmoid binary cross-entropy (new classes' labels, old classes' "
           "distillation targets) on the new data joined with the exemplars, nearest-mean-of-exemplars classifier",
           lambda memory=500, loss="bce", join=True: _icarl(memory, loss, join)),
    Recipe("icarl_ce", "iCaRL with softmax cross-entropy over every output in the place of the paper's sigmoid "
           "classification loss and the exemplars replayed beside every minibatch (BCE distillation, herding, "
           "nearest-mean classifier kept)",
           lambda memory=500, join=False: _icarl(memory, "ce", join)),
    Recipe("lwf", "learning without forgetting: distillation of the old classes' logits from the model before the experience",
           lambda weight=0.25, temperature=2.0: [build_plugin("lwf", weight=weight, temperature=temperature)]),
    Recipe("replay_lwf", "experience replay with LwF distillation from the model before the experience",
           lambda memory=500, weight=1.0: [build_plugin("replay", memory=memory), build_plugin("lwf", weight=weight)]),
    Recipe("ewc", "elastic weight consolidation: a quadratic pull to each earlier experience's parameters, weighted by its "
           "empirical Fisher", lambda lambda_=20.0, fisher_samples=None: [
               build_plugin("ewc", lambda_=lambda_, fisher_samples=fisher_samples)]),
    Recipe("online_ewc", "online EWC (Progress & Compress): one running Fisher decayed by gamma, anchored at the latest "
           "parameters", lambda lambda_=70.0, gamma=1.0: [build_plugin("ewc", lambda_=lambda_, online=True, gamma=gamma)]),
    Recipe("replay_ewc", "experience replay with EWC on the parameters of earlier experiences",
           lambda memory=500, lambda_=20.0: [build_plugin("replay", memory=memory), build_plugin("ewc", lambda_=lambda_)]),
    Recipe("progress_compress", "progress & compress: an active column with lateral adaptors from the knowledge base, "
           "distilled into it under online EWC", lambda lambda_=100.0, gamma=1.0, **options: [
               build_plugin("progress_compress", lambda_=lambda_, gamma=gamma, **options)]),
    Recipe("pnn", "progressive neural networks: a new column per task with lateral adaptors from every earlier frozen "
           "column; each sample predicted by its task's column", lambda alpha=0.1, adaptor_width=None: [
               build_plugin("progressive_networks", alpha=alpha, adaptor_width=adaptor_width)]),
    Recipe("si", "synaptic intelligence: per-parameter path integral of gradient x update; quadratic pull to the last "
           "experience's weights", lambda c=2.0, xi=1e-3: [build_plugin("si", c=c, xi=xi)]),
    Recipe("mas", "memory aware synapses: importance from the gradient of the output's squared L2 norm (no labels); "
           "quadratic pull", lambda lambda_=0.03: [build_plugin("mas", lambda_=lambda_)]),
    Recipe("gem", "gradient episodic memory: the gradient projected (dual QP) so that no past experience's memory loss rises",
           lambda per_experience=None, margin=0.05, memory=None: [
               build_plugin("gem", per_experience=per_experience, margin=margin, memory=memory)]),
    Recipe("agem", "averaged GEM: the gradient projected off a memory sample's gradient when the two conflict",
           lambda per_experience=None, sample_size=256, memory=None: [
               build_plugin("agem", per_experience=per_experience, sample_size=sample_size, memory=memory)]),
    Recipe("wa", "weight aligning: replay + LwF distillation of every sample (distill_on=\"new\": the experience's own "
           "only); after each experience the new classes' head rows are rescaled to the old classes' mean norm (head "
           "weights clipped to >= 0)",
           lambda memory=500, weight=1.0, clip=True, distill_on="all": [
               build_plugin("replay", memory=memory),
               build_plugin("lwf", weight=weight, replayed=_distill_on("wa", distill_on)),
               build_plugin("wa", clip=clip)]),
    Recipe("bic", "bias correction: replay; BiC's loss (distillation of every sample from the bias-corrected previous "
           "model, weighted n/(n+m) against the cross-entropy); a class-balanced held-out set fits (alpha, beta) on the "
           "newest classes' logits after each experience (distill=\"lwf\": LwF distillation of the new samples instead)",
           lambda memory=500, ratio=0.1, distill="bic", weighting="relative", weight=1.0: _bic(
               memory, ratio, distill, weighting, weight)),
    Recipe("bic_la", "bic trained on the logit-adjusted loss (the softmax offset by the log frequencies of the "
           "trained rows; streamcl's lift)", lambda memory=500, tau=1.0: [
               *_bic(memory), build_plugin("logit_adjustment", tau=tau)]),
    Recipe("lucir_bic", "hybrid: LUCIR (cosine head, less-forget, margin ranking, replay) with BiC's held-out bias correction",
           lambda memory=500, ratio=0.1, freeze_old=False: [
               build_plugin("replay", memory=memory), build_plugin("cosine_head", freeze_old=freeze_old),
               build_plugin("less_forget"), build_plugin("margin_ranking"), build_plugin("bias_correction", ratio=ratio)]),
    Recipe("der", "dynamically expandable representation: a masked extractor per experience beside the frozen ones, "
           "pruned after it; auxiliary |new|+1-way classifier; classifier retrained on the memory",
           lambda memory=500, sparsity_weight=1.0, classifier_epochs=30, masks=True: [
               build_plugin("replay", memory=memory),
               build_plugin("der", sparsity_weight=sparsity_weight, classifier_epochs=classifier_epochs, masks=masks)]),
    Recipe("coil", "co-transport (COIL): an optimal-transport plan between old and new class prototypes initialises the "
           "new head rows from the old ones and carries the new rows back to keep the old predictions; with replay and LwF",
           lambda memory=500, weight=1.0, **options: [build_plugin("replay", memory=memory),
                                                       build_plugin("lwf", weight=weight), build_plugin("coil", **options)]),
    Recipe("lucir", "LUCIR: cosine-normalised classifier with imprinted new-class weights, less-forget feature "
           "distillation and margin ranking on replayed samples, beside a class-balanced replay memory; the old "
           "classes' head rows fixed (freeze_old=false: every row learns)",
           lambda memory=500, lambda_base=5.0, margin=0.5, k=2, freeze_old=True: [
               build_plugin("replay", memory=memory), build_plugin("cosine_head", freeze_old=freeze_old),
               build_plugin("less_forget", lambda_base=lambda_base), build_plugin("margin_ranking", margin=margin, k=k)]),
    Recipe("multihead", "fine-tuning with one output head per task, chosen by the sample's task label (multi-head naive)",
           lambda: [build_plugin("multi_head")]),
    Recipe("ensemble", "one independent copy of the initial model per experience; the task's member predicts "
           "(class-incremental: every member's log-softmax over its own classes, pooled)",
           lambda: [build_plugin("ensemble")]),
    Recipe("packnet", "PackNet: after each task the smallest 75% of its free weights pruned, the rest retrained "
           "briefly and frozen; task t runs with the weights of tasks <= t",
           lambda prune=0.75, retrain_epochs=2: [build_plugin("packnet", prune=prune, retrain_epochs=retrain_epochs)]),
    Recipe("hat", "hard attention to the task: per-task unit masks sigmoid(s e), s annealed within each epoch; "
           "gradients to units earlier tasks use blocked, an attention regulariser keeps masks sparse",
           lambda s_max=400.0, c=0.75, clipgrad=None: [build_plugin("hat", s_max=s_max, c=c, clipgrad=clipgrad)]),
    Recipe("piggyback", "Piggyback: the first task trains the network, fixed after it; every later task learns a binary "
           "mask over its weights (straight-through scores)",
           lambda mask_lr=10.0, **options: [build_plugin("piggyback", mask_lr=mask_lr, **options)]),
    Recipe("supsup", "supermasks in superposition: fixed random signed weights, one learned top-k supermask per task; "
           "without task labels the task is inferred by the one-shot entropy gradient over the masks' superposition",
           lambda density=0.5, scores_lr=10.0, infer="sample": [
               build_plugin("supsup", density=density, scores_lr=scores_lr, infer=infer)]),
    Recipe("dgr", "deep generative replay: a VAE learns the stream beside the classifier; its samples, labelled by the "
           "frozen classifier, join every minibatch (no stored sample)",
           lambda generator="mlp", **options: [build_plugin("generative_replay", generator=generator, **options)]),
    Recipe("gnr", "generative negative replay: a VAE's samples, labelled by the frozen classifier, train only the "
           "current classes' outputs, as negatives (no stored sample)",
           lambda generator="mlp", **options: [build_plugin("generative_negative_replay", generator=generator,
                                                            **options)]),
    Recipe("bir", "brain-inspired replay: a class-conditional VAE learns the hidden representations above a frozen "
           "lower network; its samples replayed into the upper layers with the previous model's soft targets",
           lambda **options: [build_plugin("brain_inspired_replay", **options)]),
    Recipe("hypernetwork", "task-conditioned hypernetwork: each task's weights generated from its embedding; an output "
           "regulariser keeps earlier tasks' generated weights (without task labels: each experience a task, inferred "
           "by the lowest predictive entropy)",
           lambda beta=1.0: [build_plugin("hypernetwork", beta=beta)]),
    Recipe("mir", "replay of the stored samples that a virtual SGD step on the minibatch would hurt most",
           lambda memory=500, subsample=None, selection="class_balanced", score="mi1": [
               build_plugin("mir", memory=memory, subsample=subsample, selection=selection, score=score)]),
    Recipe("gdumb", "greedy class-balanced memory; the model retrained from scratch on it before each evaluation",
           lambda memory=500, epochs=128: [build_plugin("gdumb", memory=memory, epochs=epochs)]),
    Recipe("exstream", "streaming replay of per-class feature prototypes, the nearest pair merged when a class's "
           "buffer is full (ExStream), replayed through the head",
           lambda memory=500: [build_plugin("exstream", memory=memory)]),
    Recipe("latent_replay", "replay of first-hidden-layer activations; the layers below frozen after the first experience",
           lambda memory=500: [build_plugin("latent_replay", memory=memory)]),
    Recipe("cwr", "copy weights with re-init: the head's rows re-initialised before each experience, the experience's "
           "classes copied into consolidated rows after it; evaluation on those; the layers below frozen after the first",
           lambda lower_lr=0.0, lower_from=1, init="random": [
               build_plugin("cwr", lower_lr=lower_lr, lower_from=lower_from, init=init)]),
    Recipe("cwr_star", "CWR*: the experience's head rows start from their consolidated values, then are mean-shifted and "
           "averaged into them weighted by sqrt(past/current samples); the layers below frozen after the first experience",
           lambda lower_lr=0.0, lower_from=1: [build_plugin("cwr_star", lower_lr=lower_lr, lower_from=lower_from)]),
    Recipe("ar1", "AR1* with latent replay: CWR* on the head, SI on the shared layers between the latent layer and the "
           "head, the layers below the latent layer frozen (lower_lr=0) or slowed after the first experience",
           lambda memory=500, c=2.0, lower_lr=0.0, **options: [
               build_plugin("si", c=c, head=False),
               build_plugin("latent_replay", memory=memory, lower_lr=lower_lr, **options),
               build_plugin("cwr_star", lower_lr=None)]),
    Recipe("l2p", "learning to prompt: a pool of prompts with learnable keys on a frozen pre-trained ViT; each input is "
           "prompted by the prompts whose keys match its [CLS] feature", lambda pool_size=10, length=5, top_k=5,
           lambda_=0.1, **options: [build_plugin("l2p", pool_size=pool_size, length=length, top_k=top_k, lambda_=lambda_,
                                                 **options)]),
    Recipe("dualprompt", "DualPrompt: a shared G-prompt and one E-prompt per experience prefix-tuned into a frozen "
           "pre-trained ViT; at test the E-prompt whose key matches the [CLS] feature", lambda g_length=5, e_length=20,
           lambda_=1.0, **options: [build_plugin("dual_prompt", g_length=g_length, e_length=e_length, lambda_=lambda_,
                                                 **options)]),
    Recipe("seq_ft", "sequential fine-tuning of a pre-trained model: every parameter at the optimizer's one learning rate "
           "(naive, named as the pre-trained-model papers name it)", lambda: []),
    Recipe("slow_learner", "SLCA's slow learner: the representation at a learning rate 100x below the classifier head's; "
           "the loss over the current experience's classes", lambda backbone_lr=1e-4, head_lr=1e-2: [
               build_plugin("slow_learner", backbone_lr=backbone_lr, head_lr=head_lr), build_plugin("current_classes")]),
    Recipe("slca", "slow learner with classifier alignment: the slow learner, then after each experience the head "
           "re-trained on features drawn from every seen class's Gaussian", lambda backbone_lr=1e-4, head_lr=1e-2, **options: [
               build_plugin("slow_learner", backbone_lr=backbone_lr, head_lr=head_lr), build_plugin("current_classes"),
               build_plugin("classifier_alignment", **options)]),
    Recipe("joint_linear", "a linear classifier on the frozen (pre-trained) features, trained once on the whole stream "
           "joined (the upper reference of a linear probe)", lambda head_lr=1e-2: [
               build_plugin("slow_learner", backbone_lr=0.0, head_lr=head_lr)], offline=True),
    Recipe("replay_ca", "experience replay with classifier alignment (SLCA's second stage added to another method)",
           lambda memory=500, **options: [build_plugin("replay", memory=memory),
                                          build_plugin("classifier_alignment", **options)]),
    Recipe("lwf_ca", "LwF distillation with classifier alignment (SLCA's second stage added to another method)",
           lambda weight=0.25, **options: [build_plugin("lwf", weight=weight),
                                           build_plugin("classifier_alignment", **options)]),
)}


def build_method(name: str, **kwargs) -> tuple[list, Recipe]:
    """The plugin list of recipe ``name`` with its arguments, and the recipe."""
    if name not in RECIPES:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    check_arguments(recipe.plugins, kwargs, f"method '{name}'")
    return recipe.plugins(**kwargs), recipe
