"""The project's own English stop-word list (NLTK's list needs a data download).

Used by ``TextOptions(remove_stopwords=True)``. Tokens reach this list after cleaning, i.e.
lowercased and with apostrophes removed, so contractions appear without them ("dont", "youre").
Words are matched before lemmatization/stemming (surface forms: "was", "is", "has").
Contractions that collide with content words once the apostrophe is gone ("we'll" -> "well",
"she'll" -> "shell", "she'd" -> "shed", "I'd" -> "id", "I'll" -> "ill", "we'd" -> "wed") are
deliberately left out: in captions the content word is the likelier reading.
"""

from __future__ import annotations

ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are arent as at
    be because been before being below between both but by
    can cannot cant could couldnt
    did didnt do does doesnt doing dont down during
    each
    few for from further
    had hadnt has hasnt have havent having he hed hes her here heres hers herself him
    himself his how hows
    i im ive if in into is isnt it its itself
    lets
    me more most mustnt my myself
    no nor not
    of off on once only or other ought our ours ourselves out over own
    same shant she shes should shouldnt so some such
    than that thats the their theirs them themselves then there theres these they theyd
    theyll theyre theyve this those through to too
    under until up
    very
    was wasnt we were weve werent what whats when whens where wheres which while who
    whos whom why whys will with wont would wouldnt
    you youd youll youre youve your yours yourself yourselves
    """.split()
)
