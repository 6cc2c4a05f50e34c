"""The offline QA backend: questions from a paper's own structure and sentences, answers copied from its text.

Used by tasks/qa.py when `qa.backend: extractive` (no model, no network, deterministic). Per document:
- one question per section ("What is the section "Method" of <paper> about?"), answered by its first sentences;
- a definition ("In <paper>, what is DPO?") for "<Name> is a/an/the ..." sentences, and the long form of each
  abbreviation the paper introduces ("Direct Preference Optimization (DPO)");
- a method, result or comparison question for "<Name> <verb> ..." ("what does SimPO outperform?"), passives
  ("what is LLaMA-Adapter trained on?") and findings ("What does <paper> find about West-of-N?", "... about
  hyperparameter tuning?"), also behind a connective ("However, ..."), a citation after the subject, or a leading
  phrase that then goes into the question ("On Arena-Hard, SimPO achieves ..." → "... achieve on Arena-Hard?");
- how the authors reach a goal ("We use early stopping to avoid overfitting." → "How do ... avoid overfitting?");
- what the authors propose (abstract and introduction).
A <Name> must be a name the paper uses (an acronym, CamelCase, or a word it capitalises mid-sentence), a concept
it keeps using ("knowledge distillation") or its own thing ("Our pipeline" → "the authors' pipeline"), never a
pronoun, a sentence opener ("While", "Here") or a symbol ("N"). Answers must read as prose on their own: no
pronoun openers ("This", "It"), no tables, tables of contents, references, formulas, prompt/response examples,
and no pointers elsewhere ("We describe these steps in more detail below."). Table chunks, captions and sections
of worked examples (and their subsections) are never used; a subject must be what its sentence is about (not a
list item, nor a name set aside before the subject), and a person is never one.
"""

from __future__ import annotations

import re
from collections import Counter

from tasks.text import bare_section, split_sentences

# Words that open sentences but never name a method, model or dataset.
_NOT_NAMES = set("""A An The This That These Those It Its They Their Them There Here We Our Us You Your He She His Her
However Moreover Furthermore Therefore Thus Hence Then While When Where Whereas Which What Who Why How If Although
Since Because As At By For From In Into On Onto Of Over Under With Without To After Before During Between Among
Both Each Every All Most Many Some Such Other Another One Two Three First Second Third Finally Also Note Notably
Table Figure Fig Section Appendix Equation Eq Algorithm Step Example Case Given Let Consider Specifically Instead
Besides Unlike Like Compared Overall Additionally Similarly Importantly Interestingly Recently Previously Existing
Following Based Using Due Despite Through Within Across Beyond Towards Toward Unless Once Even Still Only Just
Yes No Not Human Assistant User Instruction Input Output Response Answer Question Prompt""".split())
_PRONOUN_OPENERS = set("""This That These Those It Its They Their Them Such Here There He She His Her Both Each Then
Thus Hence Therefore Similarly Instead Besides Also I You Your Let Table Figure Fig. But And Or So Please""".split())
# A sentence describing a plot ("the bars from top to bottom ..., red and light green ...") answers nothing.
_PLOT = re.compile(r"\b(?:red|blue|green|orange|purple|yellow|bars?|dashed|dotted|x-axis|y-axis|legend|heatmap)\b",
                   re.I)
_NAME = (r"(?:(?:The|Our)(?:\s+[\w\-]+){1,3}?|"  # "The reward model", or a name: "LLaMA-Adapter V2", "MT-Bench"
         r"[A-Z][\w\-.]*[\w](?:\s+(?:[A-Z0-9][\w\-]*|v\d[\w.]*|\(\w[\w\-]*\)))*"
         # what a name's models or judges do is the name's claim: "InstructGPT models show improvements ..."
         r"(?:\s+(?:models?|outputs?|judges?|variants?|policy|policies|labelers|annotators))?|"
         r"[A-Z][a-z]+(?:\s+[a-z][\w\-]*){1,3}?)")  # a concept, if _name finds it used: "Knowledge distillation"
_ADVERB = (r"(?:(?:also|further|consistently|significantly|substantially|only|first|still|even|greatly|clearly|"
           r"directly|initially|generally|typically|usually|often|mainly|largely|simply|explicitly|effectively|"
           r"successfully|easily|automatically|jointly|additionally)\s+)?")
_VERBS = ("achieves reaches outperforms surpasses beats matches exceeds underperforms improves reduces increases "
          "requires uses employs leverages adopts adds freezes trains learns updates inserts keeps removes scales "
          "decomposes quantizes introduces enables allows consists contains comprises relies generates produces "
          "predicts selects filters optimizes maximizes minimizes replaces extends combines avoids eliminates "
          "supports performs shows demonstrates yields obtains captures encodes computes measures evaluates "
          "provides builds assigns").split()
_COMPARE = {"outperforms", "surpasses", "beats", "matches", "exceeds", "underperforms"}
_DEFINITION = re.compile(rf"^(?P<term>{_NAME})(?:\s+(?P<verb>is|are|refers to|denotes)|,)\s+(?:a|an|the|one)\s")
# "WizardLM achieved ...", but not the reduced relative clause "Models trained on X were ...".
_PAST_CLAIM = re.compile(rf"^(?P<subj>{_NAME})\s+{_ADVERB}(?P<verb>\w+ed)\s+(?!is\b|are\b|was\b|were\b|in\b|on\b|by\b|"
                         rf"for\b|with\b|to\b|from\b|as\b|using\b|via\b)\w")
_CAN = re.compile(rf"^(?P<subj>{_NAME})\s+can\s+{_ADVERB}(?P<verb>(?!be\b|always\b|not\b|also\b|only\b|still\b|"
                  r"fail\b|lead\b|result\b|seem\b|appear\b|help\b)[a-z]+(?<!ly))\s+\w")
# A verb used without an object ("performs better", "increases by a few fold") asks nothing: "what does X increase?"
_NO_OBJECT = (r"(?!(?:by|from|to|in|on|at|as|with|over|across|better|worse|well|poorly|significantly|substantially|"
              r"slightly|greatly|considerably|dramatically|further|more|less|much|steadily|consistently)\b)")
_CLAIM = re.compile(rf"^(?P<subj>{_NAME})\s+{_ADVERB}(?P<verb>{'|'.join(_VERBS)})\s+{_NO_OBJECT}\w")
# Plural subjects: "LLMs achieve ...", "Reward models learn ..."
_PLURAL_CLAIM = re.compile(rf"^(?P<subj>{_NAME})\s+{_ADVERB}(?P<verb>{'|'.join(v[:-2] if v.endswith(('ches', 'shes', 'sses', 'xes')) else v[:-1] for v in _VERBS)})\s+{_NO_OBJECT}\w")
_PASSIVE = re.compile(rf"^(?P<subj>{_NAME})\s+(?P<be>is|are|was|were|can be)\s+{_ADVERB}"
                      r"(?P<part>\w+ed|built|made|taken|given|chosen|written|drawn|held|run)\s+"
                      r"(?P<prep>on|with|by|from|in|for|using|via|as|into)\s+\w")
_SHOWN = set("presented shown reported listed summarized given provided illustrated depicted displayed plotted "
             "described detailed visualized included".split())
_FINDING = re.compile(rf"^(?:We|Our (?:results|experiments|analysis))\s+(?:also\s+)?(?P<verb>find|found|observe|"
                      rf"observed|show|showed|demonstrate|note|notice|hypothesize|argue|conclude|suspect)\s+that\s+"
                      rf"(?P<subj>{_NAME})\s+\w")
_HYPOTHESIS = {"hypothesize", "argue", "conclude", "suspect"}  # asked as such: a hypothesis is no finding
# "We find that hyperparameter tuning is crucial ..." → "What do the authors of <paper> find about hyperparameter
# tuning?": a finding about a plain noun phrase (a name is _FINDING's), the phrase ending at a finite verb.
_FINDING_PHRASE = re.compile(
    r"^(?:We|Our (?:results|experiments|analysis|analyses|findings))\s+(?:also\s+|further\s+)?(?P<verb>find|found|"
    r"observe|observed|show|showed|demonstrate|demonstrated|notice|noticed|confirm|confirmed|hypothesize|argue|"
    r"conclude|suspect)\s+that\s+"
    r"(?P<np>(?:the\s+)?[a-z][\w\-]*(?:\s+[a-z][\w\-]*){0,3}?)\s+(?:[a-z]+ly\s+)?(?:is|are|was|were|can|could|"
    r"does|do|has|have|helps?|leads?|yields?|improves?|brings?|outperforms?|provides?|remains?|increases?|"
    r"decreases?|reduces?|hurts?|harms?|benefits?|matters?|plays?|achieves?|performs?|generalizes?|depends?|"
    r"affects?)\s")
_NOT_PHRASE = set("""this these that those it its they them such some most many all both each our their when if
while although even only there one two any no more less other another same following resulting former latter
above""".split())
_PURPOSE = re.compile(r"^To (?P<goal>[a-z][^,;]{8,90}), (?:we|the authors) (?:\w+ )?\w+")
# The same purpose after the action: "We adopt the framework proposed by Vicuna to assess the performance of
# chatbot models." → "How do the authors of <paper> assess the performance of chatbot models?". The goal opens with
# a verb of purpose; the action is one the authors take (not "We hope/find/present ... to"), and its object holds no
# clause whose own "to" it could be ("instructions that are used to prompt", "training them to act").
_ACTION_PURPOSE = re.compile(
    r"^We (?:also |further |first |then |additionally |\w+ly )?(?!(?:compare|set|map|convert|add|apply|assign|scale|"
    r"extend|reduce|increase|limit|restrict|refer|want|need|have|had|are|were|was|tend|hope|leave|find|found|"
    r"observe|notice|present|provide|propose|conduct|perform|make|emphasize|focus|delve|acknowledge|expect|"
    r"believe|aim|plan|try|tried|seek|encourage)\w*\b)[a-z]+ "
    r"(?P<obj>[^,;:]{3,80}?) (?:in order )?to "
    r"(?P<goal>(?:assess|evaluate|measure|estimate|compute|calculate|quantify|determine|identify|find|select|choose|"
    r"filter|remove|eliminate|avoid|prevent|mitigate|reduce|improve|increase|boost|enhance|encourage|ensure|"
    r"maintain|preserve|stabilize|accelerate|speed|align|label|annotate|classify|rank|score|judge|verify|check|"
    r"test|create|construct|build|generate|produce|collect|obtain|gather|sample|augment|initialize|train|"
    r"fine-tune|finetune|organize|partition|cluster|split|encode|represent|capture|model|simulate|mimic|handle|"
    r"address|control|guide|steer|balance|allow|enable|support|facilitate|compare|analyze|study|understand|"
    r"explore|investigate|deduplicate|translate|crowdsource|fit|adapt|extend|scale|learn|extract)\b"
    r"[^,;:()]{6,70}?)(?:[,;:]|\.$)")
_CLAUSE = re.compile(r"\b(?:that|which|who|how|whether|is|are|was|were|used|able|them|it|us|him|her)\b")
# "Combining the task definition with positive examples yields further improvement." → "According to <paper>, what
# does combining the task definition with positive examples yield?"
_GERUND_CLAIM = re.compile(r"^(?P<subj>[A-Z][a-z]{2,}ing(?: [\w\-]+){1,7}?) (?:\w+ly )?(?P<verb>yields|improves|"
                           r"reduces|increases|boosts|degrades|hurts|enables|brings|leads to|results in)"
                           r" (?!to\b|in\b|by\b)\w")
_OPENER = re.compile(r"^(?:However|Moreover|Furthermore|Additionally|Finally|Overall|Notably|Specifically|Importantly|"
                     r"Interestingly|Surprisingly|Consequently|Empirically|In addition|In particular|In contrast|"
                     r"As a result|In practice|In summary|In fact|In other words|In general|In short|For instance|"
                     r"For example|At the same time|On the other hand|More importantly|Most importantly|Nevertheless|"
                     r"Nonetheless|Meanwhile|Lastly|To this end|First|Second|Third|Next|Then),\s+")
_DEIXIS = re.compile(r"\b(?:this|these|that|those|it|its|them|such|above|former|latter)\b", re.I)
# "We evaluate SimPO on AlpacaEval 2." → "What do the authors of <paper> evaluate SimPO on?"
_WE_DO = re.compile(r"^We (?:also |further |first |then |additionally )?(?P<verb>evaluate|train|fine-tune|finetune|"
                    r"compare|test|pre-train|pretrain|apply|initialize|benchmark|set|use|adopt|employ|choose|select|"
                    r"collect|generate|sample|filter|conduct|annotate|prompt|insert|add|extend|scale|measure|report)"
                    r"(?:d|ed)? (?P<obj>[\w\-.]+(?: [\w\-.]+){0,4}?) (?P<prep>on|with|to|against|using|as|for|from|"
                    r"into) (?P<rest>[\w\-])")
# "We conduct experiments to measure ...": "to" opens a purpose, not the object's complement ("apply X to Y")
_INFINITIVE = re.compile(r"(?!(?:the|a|an|our|their|its|each|every|all|both|any|some|this|these|that|those)\b)"
                         r"[a-z]+\b(?! of\b)")
_TO_OBJECT = {"compare", "apply", "set", "add", "insert", "extend", "scale"}  # "compare X to human judgments"
_FOR = re.compile(r"^For (?P<x>[a-zA-Z][^,;]{2,50}), we (?:also )?(?P<verb>use|adopt|employ|follow|set|choose|select|"
                  r"apply|report|consider|train|evaluate|sample|collect)\b")
# "our default training method", "the same hyperparameters": what they are is said elsewhere.
_VAGUE_OBJECT = re.compile(r"\b(?:default|same|following|above|previous|proposed|original|standard)\b")
# "We deduplicate prompts by checking ..." → "How do the authors of <paper> deduplicate prompts?"
# Also "... using/via/through X"; the verb in the present tense only (the question repeats it as written).
_BY = re.compile(r"^We (?:also |further |first |then |additionally |\w+ly )?(?P<verb>(?!have\b|are\b|can\b|make\b|"
                 r"let\b|get\b|keep\b|believe\b|hope\b|expect\b|think\b|note\b|see\b|[a-z]+ed\b)[a-z]{3,}) "
                 r"(?P<obj>(?:the |a |an |each |every |all )?[\w\-]+(?: [\w\-]+){0,5}?) "
                 r"(?:by [a-z]+ing|using|via|through)\b")
# "MiniGPT-4 connects a frozen visual encoder ..." with a verb no list foresees: the object follows at once.
_ANY_VERB = re.compile(rf"^(?P<subj>{_NAME})\s+{_ADVERB}(?P<verb>[a-z]{{3,}}s)\s+(?:a|an|the|its|their|both|all|"
                       rf"several|multiple|two|three|[a-z]+(?:ed|ing|al|ive|ous|ic)|[A-Z][\w\-]*)\s")
# "MT-bench is designed to test multi-turn conversation ..." → "In <paper>, what is MT-bench designed to do?"
_DESIGNED = re.compile(rf"^(?P<subj>{_NAME})\s+(?P<be>is|are|was|were)\s+{_ADVERB}(?P<part>designed|used|trained|"
                       r"built|developed|intended|meant|constructed|optimized|fine-tuned|finetuned)\s+to\s+"
                       r"(?!the\b|a\b|an\b)[a-z]+\s")
# "SimPO is more memory and compute-efficient than DPO.", "GPT-4 tends to generate longer sequences than GPT-3.5",
# "DPO lags behind SimPO in ..." → "how does SimPO compare with DPO?": two names the sentence compares.
_THAN = re.compile(rf"^(?P<subj>{_NAME})\s+(?:(?:is|are|was|were|performs|tends to|lags behind)\b[^,;:()]{{0,60}}?"
                   rf"(?:\b(?:more|less|fewer|better|worse)\b|(?!other\b|rather\b)\w{{2,}}er\b)[^,;:()]{{0,40}}?\bthan|"
                   rf"lags behind)\s+"
                   rf"(?P<other>{_NAME})\b")
# "PoSE simulates long inputs by manipulating position indices" → "how does PoSE simulate long inputs?"
_BY_MEANS = re.compile(rf"^(?P<subj>{_NAME})\s+{_ADVERB}(?P<verb>[a-z]{{3,}}s)\s+"
                       r"(?P<obj>[a-z][\w\-]*(?:\s[\w\-]+){0,5}?)\s+by\s+[a-z]+ing\b")
# Not verbs, or verbs that take no object ("P-tuning appears promising": what does it appear?)
_NOT_VERBS = set("""is has was does its this thus plus across versus always perhaps less unless as us various
previous serious numerous focus bias corpus status appears seems becomes remains tends fails goes comes lies stays
looks results leads endows puts places models outputs inputs responses samples settings tasks""".split())
_PROPOSE = re.compile(r"\b(?:we|this paper|this work)\s+(?:propose|introduce|present|describe)s?\b", re.I)
_ABBREVIATION = re.compile(r"(?P<long>(?:[\w\-]+\s+){1,7}?[\w\-]+)\s+\((?P<short>[A-Z][A-Za-z0-9\-]*[A-Z][a-z]?s?)\)")
_FUNCTION_WORDS = {"of", "for", "from", "with", "and", "the", "a", "an", "to", "in", "on", "via", "by"}

# Answers that are not prose: references, tables of contents, formulas, tables, examples, pointers elsewhere.
_REFERENCE = re.compile(r"arXiv|preprint|Proceedings|In Advances|Conference on|https?://|doi\.org|\bURL\b|"
                        r"\bpp\.\s*\d|\bvol\.\s*\d", re.I)
_TOC = re.compile(r"(?:\.\s){3,}|\.{4,}")
_MATH = re.compile(r"[=∑∏∫θπλαβγδσμτφψωΔ∈≤≥≈×→←∀∃⊂∗·|^_{}\\]")
# "Prompt Below is an instruction ..." opens a prompt example; "Prompt tuning removes ..." is prose.
_EXAMPLE = re.compile(r"\bPrompt format\b|\bExample prompt\b|\bDataset features\b|^Prompt (?![a-z])|"
                      r"\b(?:Instruction|Input|Output|Response|Human|Assistant|USER|ASSISTANT|Answer|Question|"
                      r"Prompt|Context)\s*:|###|<\|")
# "described below" points elsewhere; "below a billion parameters" and "slightly below fine-tuning" compare.
_POINTER = re.compile(r"\b(?:(?:shown|described|listed|given|discussed|explained|detailed|defined|presented|see|as)"
                      r" below|below(?=\s*[.:;,)])|as follows|the following|aforementioned|in more detail)\b", re.I)
_NUMBER = re.compile(r"^[\d.,%±()\-–]+$")
# A finite verb, or a subject that has one ("we use"): "Impact of γ on the reward distribution." and "PoSE
# fine-tuning for extending the context window size from 2,048 to 8,192." have none, "Use the word in a
# sentence." (an instruction in an example) neither.
_FINITE = re.compile(r"(?i:\b(?:is|are|was|were|be|been|has|have|had|can|cannot|could|may|might|will|would|"
                     r"should|must|does|do|did|we|they|it[’']s)\b)|\b[a-z]{2,}(?:ed|s)\b")
_CITATIONS = re.compile(r"\[\d+(?:\s*[,–-]\s*\d+)+\]")  # "[10, 17, 22]", "[12,49]", "[4–6]"


def prose(sentence: str) -> bool:
    """A sentence that answers something on its own."""
    words = sentence.split()
    if not 6 <= len(words) <= 60 or not sentence[0].isupper() or sentence[-1] not in ".!":
        return False
    if sum(ch.isalpha() for ch in words[0]) < 2 and words[0] != "A":  # a symbol as subject: "N is the number of"
        return False
    if _PLOT.search(sentence) or sentence.endswith("et al.") or re.match(r"^\S+(?: \S+){0,3} then\b", sentence):
        return False  # a plot's description, a citation cut in two, a step that needs the previous one
    if len(words) < 10 and re.search(r"\b(?:them|it|this|these|those)\b", sentence, re.I):
        return False  # "We listed them in Table 5."
    if words[0].rstrip(",") in _PRONOUN_OPENERS or _POINTER.search(sentence) or _EXAMPLE.search(sentence):
        return False
    if _REFERENCE.search(sentence) or _TOC.search(sentence) or len(_MATH.findall(sentence)) >= 2:
        return False
    if re.search(r"\(\d{1,2}\)\s*\.?$", sentence):  # ends with an equation number
        return False
    if sentence.count("(") != sentence.count(")") or re.search(r"•|\.\.\.|…|\[[A-Z]+\]|\(i+\)", sentence):
        return False  # a fragment cut from a figure or list, a placeholder, an elided example
    if ":" in " ".join(words[:5]) or re.match(r"(?:[A-Z]|\d+)\.\d", sentence):  # a label, or a heading run in
        return False
    if sum(w.islower() for w in words) < 0.4 * len(words):  # a run of names and numbers from a figure, not prose
        return False
    if re.search(r"(?:[A-Z][\w\-]* \d+\.\d+ \*? ?){2}", sentence):  # a table's row: "BERT-base 48.3 BERT-large 50.6"
        return False
    if not _FINITE.search(sentence):  # no verb: a figure's title, a caption's fragment, an example's instruction
        return False
    letters = sum(ch.isalpha() for ch in sentence)
    # A table row is mostly numbers; a long sentence may give ranges ("900 to 330,000 examples, 2 to 157 classes"),
    # but a list of citations ("[10, 17, 22, 28]") never makes an answer read better: then five numbers at most.
    numbers = sum(bool(_NUMBER.match(w)) for w in words)
    cap = 5 if _CITATIONS.search(sentence) else max(5, len(words) // 5)
    return letters >= 0.7 * len(sentence.replace(" ", "")) and numbers <= cap


def names_in(chunks: list[dict]) -> tuple[Counter, str, set[str]]:
    """Capitalised words the paper uses inside sentences (not only as their first word): its names; its
    lower-cased text, to tell a recurring concept ("the reward model") from a passing phrase; and the words it
    writes in lower case (a person's name never is: "Chatbot Arena" is a benchmark, "David Weissman" a person)."""
    counts: Counter = Counter()
    for c in chunks:
        for m in re.finditer(r"(?<=[a-z,;] )([A-Z][\w\-]*)", c["text"]):
            counts[m[1]] += 1
    return (counts, " ".join(c["text"].lower() for c in chunks),
            {w for c in chunks for w in re.findall(r"\b[a-z]+\b", c["text"])})


_VAGUE = set("""goal idea result results reason answer difference key main effect first second last same other rest
problem question approach method methods model models work paper study following process task data first final
overall proposed original new current above previous latter former code example examples response responses
prompt prompts answer answers output outputs input inputs user assistant text passage questions tasks task
samples sample instances instance values value numbers number scores score settings setting cases case experiments
experiment datasets dataset benchmarks benchmark baselines baseline two three four both""".split())


def _name(phrase: str, names: tuple[Counter, str, set[str]]) -> str | None:
    """The phrase if it names something of the paper: a name (SimPO, GPT-4, a word the paper capitalises
    mid-sentence), "the <concept>" when the paper uses that concept at least three times, or "the authors'
    <thing>" for the paper's own ("Our pipeline"); else None."""
    words = phrase.split()
    first = words[0]
    if first == "Our" and 2 <= len(words) <= 3 and all(re.fullmatch(r"[a-z][a-z\-]*", w) for w in words[1:]) \
            and not {words[-1]} & _FUNCTION_WORDS and not set(words) & _AUXILIARIES:  # "Our approach does"
        return "the authors' " + " ".join(words[1:])  # "Our pipeline generates ...": the paper's own pipeline
    if first in ("The", "Our") and len(words) == 2 and (words[1].islower() or words[1] in _GENERIC):
        return None  # "the LLM", "the function": which one, the sentence alone does not say
    if first in ("The", "Our") and 2 <= len(words) <= 4 and not _VAGUE & {w.lower() for w in words[1:]}:
        concept = " ".join(words[1:]).lower()
        if names[1].count(concept) >= 3 and all(w[0].isalnum() for w in words[1:]):
            return "the " + " ".join(words[1:]) if first == "The" else None
        return None
    if 2 <= len(words) <= 4 and all(w.islower() for w in words[1:]) and first[1:].islower():
        # "Instruction tuning is ...": a concept the paper keeps using, else a passing phrase ("Genie offers
        # flexibility and ...", run up to the next verb)
        concept = first not in _NOT_NAMES | _WHICH_ONE and words[-1] not in _FUNCTION_WORDS
        return phrase.lower() if concept and names[1].count(phrase.lower()) >= 3 else None
    # "Considering PET", "Consequently, ...": a gerund or adverb opens the sentence; "P-tuning" is a name.
    if first in _NOT_NAMES or len(words) > 5 or sum(ch.isalpha() for ch in first) < 2 or \
            re.fullmatch(r"[A-Z][a-z]+(?:-[a-z]+)*(?:ing|ly)", first):
        return None
    if len(set(words)) < len(words):  # "Stop Using BLEU BLEU": cells of a table read as a line
        return None
    if 2 <= len(words) <= 3 and all(re.fullmatch(r"[A-Z][a-z]+", w) for w in words) \
            and not any(w.lower() in names[2] for w in words):
        return None  # a person ("David Weissman"): no word of it is ever written in lower case
    # SimPO, GPT-4, LLaMA, MT-Bench, "Direct Preference Optimization (DPO)"
    distinctive = any(ch.isupper() or ch.isdigit() for w in words for ch in w.strip("()")[1:])
    return phrase if distinctive or names[0][first] >= 2 else None


_WHICH_ONE = {"Recent", "Previous", "Prior", "Existing", "Future", "Related", "Concurrent"}  # "Recent work": which?
_AUXILIARIES = set("""do does did is are was were has have had can could may might will would should not also
only""".split())
_PARTICLE = {"consist": "consist of", "rely": "rely on"}  # "what does SimPO consist of?"


def _base(verb: str) -> str:
    base = verb[:-2] if verb.endswith(("ches", "shes", "sses", "xes")) else verb[:-1]
    base = "rely" if base == "relie" else base
    return _PARTICLE.get(base, base)


def _infinitive(past: str) -> str | None:
    """ "outperformed" → "outperform" for the verbs of claims, else None."""
    for verb in _VERBS:
        base = _base(verb)
        if past in (base + "ed", base + "d", base[:-1] + "ied" if base.endswith("y") else ""):
            return base
    return None


def _abbreviations(sentence: str) -> list[str]:
    """ "Direct Preference Optimization (DPO)" where the long form's initials spell the abbreviation."""
    out = []
    for m in _ABBREVIATION.finditer(sentence):
        short = m["short"].rstrip("s") if m["short"][-1] == "s" and m["short"][-2].isupper() else m["short"]
        letters = [ch.lower() for ch in short if ch.isalpha()]
        words = m["long"].split()
        for start in range(len(words)):  # the shortest tail of the phrase whose initials spell it
            tail = words[start:]
            parts = [p for w in tail for p in w.split("-") if p]
            initials = [p[0].lower() for p in parts if p.lower() not in _FUNCTION_WORDS]
            if initials == letters and tail[0].lower() not in _FUNCTION_WORDS:
                out.append(f"{' '.join(tail)} ({m['short']})")
                break
    return out


# Sections whose lead is thanks, or a prompt or model output shown as an example: nothing a reader would ask about.
_NO_SECTION_QUESTION = re.compile(r"acknowledg|contribution|funding|prompt|template|example|case stud",
                                  re.I)


def section_name(section: str) -> str | None:
    """ "3.2 Method" → "Method"; None for headings that are not a section name (sentences, page numbers)."""
    name = bare_section(section).rstrip(".")
    name = re.sub(r"\s+\d+$", "", name)  # "Introduction 4": a table-of-contents entry's page number
    words = name.split()
    if _NO_SECTION_QUESTION.search(name):
        return None
    if not 1 <= len(words) <= 8 or not name[0].isupper() or sum(ch.isalpha() for ch in name) < 4:
        return None
    return None if section.rstrip().endswith((".", "?", ":")) and len(words) > 3 else name


_CITATION = re.compile(r"\s*(?:\((?=[^()]*[A-Z])[^()]*?\b(?:19|20)\d{2}[a-z]?\)|\[\d+(?:\s*[,–-]\s*\d+)*\])")
# "GSM8K is the benchmark that shows the most volatility" ranks GSM8K; it does not say what GSM8K is.
_RANKING = re.compile(r"\b(?:most|least|best|worst|highest|lowest|largest|smallest|first|only)\b")


def sentence_pairs(sentence: str, paper: str, section: str, names: tuple) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one sentence; the answer is the sentence, or a phrase of it."""
    out = [("definition", f'In {paper}, what does the abbreviation "{a.split("(")[-1][:-1]}" stand for?', a)
           for a in _abbreviations(sentence)]
    if not prose(sentence):
        return out
    answer = sentence
    sentence = _OPENER.sub("", sentence)  # "However, SimPO ...": the question is about SimPO
    # "Self-Correction (Welleck et al., 2022) decouples ...": a citation between subject and verb hides the subject
    sentence = _CITATION.sub("", sentence[0].upper() + sentence[1:])
    claims = claim_pairs(sentence, answer, paper, section, names)
    # "In contrast to linear interpolation, NTK Interpolation alters ...": the subject after a leading phrase; not
    # "we" (what the authors do under a condition is asked with the condition, by the patterns above)
    rest = sentence[m.end():] if (m := _LEADING.match(sentence)) else ""
    if not claims and rest and not re.match(r"(?:our|it|this|they)\b", rest):
        claims = claim_pairs(rest[0].upper() + rest[1:], answer, paper, "", names)
        if rest.startswith("we"):  # what the authors do there is asked only as how they reach a goal: the
            claims = [c for c in claims if c[1].startswith("How do the authors")]  # condition stays in the answer
        # "On Arena-Hard, SimPO achieves ...": where the claim holds belongs to the question ("what does SimPO
        # achieve on Arena-Hard?"), and tells it from the paper's other claims about SimPO
        where = m[0].rstrip(", ")
        if re.match(r"(?:On|In(?! contrast| comparison)|For|Across|Among|At|Under|During) ", where) \
                and not _DEIXIS.search(where) and not re.search(r"\b(?:we|our|us)\b", where, re.I) \
                and len(where.split()) <= 6:
            where = where[0].lower() + where[1:]
            claims = [(k, q[:-1] + f" {where}?" if not q.startswith("How do") else q, a) for k, q, a in claims]
    if not claims and (m := _APPOSITIVE.match(sentence)) and not sentence.startswith("We "):
        claims = claim_pairs(f"{m['subj']} {sentence[m.end():]}", answer, paper, "", names)
    return out + claims


# A leading phrase set off by a comma before the subject: "In contrast to X, ", "For ARC and HellaSwag, ".
_LEADING = re.compile(r"^(?:In|On|For|With|Compared (?:to|with)|Unlike|Similar to|Following|Beyond|Across|Among|"
                      r"At|After|During|Under|Despite|As in|As with|Due to|Based on|In contrast to|While|Although|"
                      r"Though|Whereas|Since|Because)\s[^,;:]{2,60},\s+")
# A phrase set off by commas after the subject: "The system message, placed at the start of the prompt, provides".
_APPOSITIVE = re.compile(r"^(?P<subj>(?:\S+\s){0,3}[^\s,]+), (?!and\b|or\b|but\b|which\b|who\b)[^,;:()]{3,80}, "
                         r"(?=[a-z])")


def claim_pairs(sentence: str, answer: str, paper: str, section: str, names: tuple) -> list[tuple[str, str, str]]:
    """The question one pattern of claims asks about a sentence (a list of one, or empty); `answer` is the
    sentence as written."""
    out = []
    if (m := _DEFINITION.match(sentence)) and (term := _name(m["term"], names)) and not _RANKING.search(sentence):
        be = "are" if m["verb"] == "are" or (not m["verb"] and term.endswith("s") and term[-2].islower()) else "is"
        out.append(("definition", f"In {paper}, what {be} {term}?", answer))
    elif (m := _CLAIM.match(sentence)) and (subj := _name(m["subj"], names)):
        kind = "comparison" if m["verb"] in _COMPARE else "result" if re.search(r"\d", sentence) else "method"
        out.append((kind, f"According to {paper}, what does {subj} {_base(m['verb'])}?", answer))
    elif (m := _PLURAL_CLAIM.match(sentence)) and (subj := _name(m["subj"], names)) and subj.endswith("s"):
        kind = "comparison" if m["verb"] + "s" in _COMPARE else "result" if re.search(r"\d", sentence) else "method"
        out.append((kind, f"According to {paper}, what do {subj} {_PARTICLE.get(m['verb'], m['verb'])}?", answer))
    elif (m := _PAST_CLAIM.match(sentence)) and _infinitive(m["verb"]) and (subj := _name(m["subj"], names)) \
            and subj[0].isupper():
        verb = _infinitive(m["verb"])
        kind = "comparison" if verb + "s" in _COMPARE else "result" if re.search(r"\d", sentence) else "method"
        out.append((kind, f"According to {paper}, what did {subj} {verb}?", answer))
    elif (m := _CAN.match(sentence)) and (subj := _name(m["subj"], names)):
        verb = _PARTICLE.get(m["verb"], m["verb"])
        out.append(("method", f"According to {paper}, what can {subj} {verb}?", answer))
    elif (m := _PASSIVE.match(sentence)) and (subj := _name(m["subj"], names)) \
            and not (m["prep"] == "in" and m["part"] in _SHOWN):  # "are presented in Table 4" says only where
        be, after = ("can", f" be {m['part']}") if m["be"] == "can be" else (m["be"], f" {m['part']}")
        out.append(("method", f"In {paper}, what {be} {subj}{after} {m['prep']}?", answer))
    elif (m := _FINDING.match(sentence)) and (subj := _name(m["subj"], names)):
        verb = m["verb"] if m["verb"] in _HYPOTHESIS else "find"
        out.append(("result", f"What does {paper} {verb} about {subj}?", answer))
    elif (m := _FINDING_PHRASE.match(sentence)) and not _NOT_PHRASE & set(words := m["np"].split()) \
            and set(words) - _VAGUE - _FUNCTION_WORDS:  # "the model" is which model? the sentence alone does not say
        verb = m["verb"] if m["verb"] in _HYPOTHESIS else "find"
        out.append(("result", f"What do the authors of {paper} {verb} about {m['np']}?", answer))
    elif (m := _PURPOSE.match(sentence)) and not _DEIXIS.search(m["goal"]) and " " in m["goal"]:  # "To summarize"
        goal = re.sub(r"\bour\b", "their", m["goal"])
        out.append(("method", f"How do the authors of {paper} {goal}?", answer))
    # "to ensure their faithfulness": in the question "their" would be the authors'
    elif (m := _ACTION_PURPOSE.match(sentence)) and not _DEIXIS.search(m["goal"]) and not _CLAUSE.search(m["obj"]) \
            and len(m["goal"].split()) <= 10 and not re.search(r"\btheir\b", m["goal"]):
        goal = re.sub(r"\bour\b", "their", m["goal"])
        out.append(("method", f"How do the authors of {paper} {goal}?", answer))
    elif (m := _GERUND_CLAIM.match(sentence)) and not _DEIXIS.search(m["subj"]):
        subj = m["subj"][0].lower() + m["subj"][1:]
        verb = {"leads to": "lead to", "results in": "result in"}.get(m["verb"], _base(m["verb"]))
        kind = "result" if re.search(r"\d", sentence) else "method"
        out.append((kind, f"According to {paper}, what does {subj} {verb}?", answer))
    elif (m := _WE_DO.match(sentence)) and not _DEIXIS.search(m["obj"]) and m["obj"].split()[0] not in ("a", "an") \
            and not _VAGUE_OBJECT.search(m["obj"]) and "," not in sentence[m.start("rest"):].split(" (")[0][:40] \
            and not (m["prep"] == "to" and m["verb"] not in _TO_OBJECT
                     and _INFINITIVE.match(sentence[m.start("rest"):])):
        verb = {"finetune": "fine-tune", "pretrain": "pre-train"}.get(m["verb"], m["verb"])
        if m["verb"] in ("use", "adopt", "employ", "choose", "select"):  # what is used: the object is the answer
            rest = re.sub(r"\bour\b", "their", sentence[m.start("rest"):].rstrip("."))
            if len(rest.split()) <= 12 and not _DEIXIS.search(rest) and not re.match(r"(?:in|defined|[A-Z])", rest):
                out.append(("method", f"What do the authors of {paper} {verb} {m['prep']} {rest}?", answer))
        else:
            kind = "comparison" if verb == "compare" else "method"
            obj = re.sub(r"\bour\b", "their", m["obj"])
            out.append((kind, f"What do the authors of {paper} {verb} {obj} {m['prep']}?", answer))
    elif (m := _DESIGNED.match(sentence)) and (subj := _name(m["subj"], names)):
        out.append(("method", f"In {paper}, what {m['be']} {subj} {m['part']} to do?", answer))
    elif (m := _THAN.match(sentence)) and (subj := _name(m["subj"], names)) and (other := _name(m["other"], names)) \
            and subj.lower() != other.lower():
        out.append(("comparison", f"According to {paper}, how does {subj} compare with {other}?", answer))
    elif (m := _BY_MEANS.match(sentence)) and m["verb"] not in _NOT_VERBS and not _DEIXIS.search(m["obj"]) \
            and (subj := _name(m["subj"], names)):
        out.append(("method", f"According to {paper}, how does {subj} {_base(m['verb'])} {m['obj']}?", answer))
    elif (m := _ANY_VERB.match(sentence)) and m["verb"] not in _NOT_VERBS and (subj := _name(m["subj"], names)):
        verb = _base(m["verb"]) if m["verb"].endswith(("ches", "shes", "sses", "xes")) else \
            m["verb"][:-3] + "y" if m["verb"].endswith("ies") else m["verb"][:-1]
        kind = "result" if re.search(r"\d", sentence) else "method"
        out.append((kind, f"According to {paper}, what does {subj} {verb}?", answer))
    elif (m := _BY.match(sentence)) and not _DEIXIS.search(m["obj"]) and m["obj"].split()[-1] not in _FUNCTION_WORDS:
        obj = re.sub(r"\bour\b", "their", m["obj"])
        out.append(("method", f"How do the authors of {paper} {m['verb']} {obj}?", answer))
    elif (m := _FOR.match(sentence)) and not _DEIXIS.search(m["x"]):
        out.append(("method", f"What do the authors of {paper} {m['verb']} for {m['x']}?", answer))
    elif _PROPOSE.search(sentence) and section.lower() in ("abstract", "introduction", "conclusion", "conclusions") \
            and not sentence.rstrip(".").endswith(":"):  # elsewhere "we present ..." is mostly results or setup
        out.append(("proposal", f"What do the authors of {paper} propose?", answer))
    return out


# GPT-4, GPT-3.5, AlpacaEval 2, LLaMA-Adapter V2 (whole tokens only: not "GPT-3" inside "GPT-3.5")
_DISTINCT = re.compile(r"(?<![\w\-.;/+])[A-Z][a-z]*[A-Z0-9][\w\-]*(?:\.\d+)?(?: (?:\d[\d.]*|V\d))?(?![\w\-;/+]|\.\d)")
_GENERIC = set("""AI API CPU GPU NLP NLU NLG LLM LLMs LM LMs QA ML RL URL HTTP CSS HTML JSON PDF SOTA MUST NOT""".split())
_ADJECTIVE_SUFFIX = re.compile(r"-(?:generated|based|style|like|tuned|only|level|free|sized?|specific|aware|aligned)$")


# A leading phrase that sets a name aside ("Similar to AGIEval, Vicuna ..."; "For small datasets (COPA, ...), we").
_ASIDE = re.compile(r"(?:[A-Z][\w-]*ing\b|Similar to|Like|Unlike|Compared (?:to|with)|In contrast to|Following|"
                    r"As in|As with|Besides|Apart from|Except for|For|On|In|With|From|Beyond|Among|Including|"
                    r"Inspired by)\b")


def about(sentence: str, start: int, end: int) -> bool:
    """Whether the name at sentence[start:end] is what the sentence is about: not one item of a list ("CB, WiC,
    RTE and WSC"), not inside brackets, not in a leading phrase that sets it aside before the subject."""
    before, after = sentence[:start], re.sub(r"^\s*\[[\d,\s–-]+\]", "", sentence[end:])  # "CLIP-Adapter [8], ..."
    if before.count("(") > before.count(")") or before.count("[") > before.count("]"):
        return False
    if re.match(r"\s*(?:,|/|and\b|or\b)\s*[A-Z]", after) or re.search(
            r"(?:,|/|\band|\bor|such as|\blike|including|e\.g\.,?)\s*$", before):
        return False
    return not (_ASIDE.match(sentence) and "," in after.split(".")[0])


def topic_pairs(found: dict[str, tuple[int, str, str]], text: str, title: str, paper: str) -> list[tuple]:
    """ "What does <paper> say about AlpacaEval 2?" for each name the paper uses, answered by the sentence that puts
    it most up front (within its first words, as what the sentence is about). A word of the paper's own prose set
    in capitals ("LENGTH", "DEFINITION": a prompt template's fields) is no name. Worked examples were left out
    before, so a name used once is kept: a baseline or a benchmark is often named in one place only."""
    return [("fact", f"What does {paper} say about {name}?", sentence, chunk_id)
            for name, (_, sentence, chunk_id) in found.items()
            # "Llama3-" is a name cut at a line end; "BERT-base 48.3" a table's cell
            if name not in title and name not in _GENERIC and not _ADJECTIVE_SUFFIX.search(name)
            and not name.endswith("-") and not re.search(r" \d+\.\d", name)
            and not (name.isalpha() and name.isupper() and f" {name.lower()} " in text)]


# Sections that show worked examples, prompts or model outputs ("11 Case Studies", "I Case Studies", "C Examples
# of Generated Instructions"): their sentences are the examples' ("Microsoft is a huge company ..."), not the
# paper's, and so are those of their subsections ("11.13 Meeting Transcript Processing").
_EXAMPLE_SECTION = re.compile(r"case stud|\bexamples?\b|\bprompts? (?:templates?|used)|\btemplates?\b|"
                              r"\bqualitative (?:examples|samples)|\bsamples? of|\bmodel outputs?\b", re.I)
_CAPTION = re.compile(r"(?:Table|Figure|Fig\.)\s+(?:[A-Z]\.?)?\d{1,3}(?:\.\d{1,2})?\s*[:.|]")
_TOP_NUMBER = re.compile(r"(\d{1,2}|[A-Z])\.?\s")  # "11 Case Studies", "C. Examples"
_SECTION_NUMBER = re.compile(r"(\d{1,2}|[A-Z])(?:\.\d{1,2})+\.?\s")  # "11.13 Meeting Transcript Processing"


def example_sections(chunks: list[dict]) -> set[str]:
    """The sections (as chunks name them) that are worked examples, or sit under a top-level one that is."""
    top: dict[str, str] = {}  # top-level number → its heading, as met in reading order
    out = set()
    for c in chunks:
        if m := _TOP_NUMBER.match(c["section"]):
            top[m.group(1)] = c["section"]
        m = _SECTION_NUMBER.match(c["section"])
        if _EXAMPLE_SECTION.search(c["section"]) or (m and _EXAMPLE_SECTION.search(top.get(m.group(1), ""))):
            out.add(c["section"])
    return out


def extractive_document(chunks: list[dict]) -> list[dict]:
    """Candidate pairs for one document's chunks (in reading order), each with its chunk_id. Tables, captions
    (a figure's parts and a table's cells are not what a reader asks about) and worked examples are skipped."""
    examples = example_sections(chunks)
    text_chunks = [c for c in chunks if c.get("kind", "text") == "text" and not len(_EXAMPLE.findall(c["text"])) > 1
                   and not _CAPTION.match(c["text"]) and c["section"] not in examples]
    names = names_in(text_chunks)
    pairs: list[dict] = []
    seen_sections: set[str] = set()
    topics: dict[str, tuple[int, str, str]] = {}
    for c in text_chunks:
        paper = f'"{c["title"]}"'
        sentences = split_sentences(c["text"].replace("\n\n", " "))
        found: list[tuple[str, str, str]] = []
        name = section_name(c["section"])
        if name and c["section"] not in seen_sections:  # one question per section, from its first chunk
            seen_sections.add(c["section"])
            lead = []  # the first prose sentences, adjacent: a second one may point back to the first only
            for s in sentences[:4]:
                if prose(s):
                    lead.append(s)
                elif lead:
                    break
            lead = lead[:2]
            where = "abstract" if name.lower() == "abstract" else f'section "{name}"'
            if lead:
                found.append(("section", f"What is the {where} of {paper} about?", " ".join(lead)))
        for s in sentences:
            pairs_of_s = sentence_pairs(s, paper, name or "", names)
            found += pairs_of_s
            if not [k for k in pairs_of_s if k[0] != "definition" or "abbreviation" not in k[1]] and prose(s) \
                    and len(s.split()) >= 8:
                for m in _DISTINCT.finditer(" ".join(s.split()[:6])):
                    if m.start() < topics.get(m[0], (10**6,))[0] and about(s, m.start(), m.end()):
                        topics[m[0]] = (m.start(), s, c["chunk_id"])
        questions = set()
        for kind, question, answer in found:
            # a question about a symbol ("... with and without S?") means nothing without the formula
            if question not in questions and not re.search(r"\s[B-HJ-Z]\b(?!-)|\s[a-z]\?", question):
                questions.add(question)
                pairs.append({"kind": kind, "question": question, "answer": answer, "chunk_id": c["chunk_id"]})
    if text_chunks:
        title = text_chunks[0]["title"]
        for kind, question, answer, chunk_id in topic_pairs(topics, names[1], title, f'"{title}"'):
            pairs.append({"kind": kind, "question": question, "answer": answer, "chunk_id": chunk_id})
    return pairs
