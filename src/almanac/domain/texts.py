"""The words of the built-in reading generator, kept apart from the code that arranges them.

Every table is keyed by the same vocabulary the chart uses (lowercase sign and body names,
houses 1-12, the five major aspect kinds), and every table is complete, so composing a
reading can never fail on a lookup. Paragraphs are written to stand on their own and to sit
next to any other paragraph, because the generator combines them freely. Templates have
named ``{slots}``; a slot is only ever filled with other text from this module, never with
user input, so ``str.format`` cannot be tricked into reading attributes.
"""

from __future__ import annotations

from typing import Final, NamedTuple

SIGNS: Final[tuple[str, ...]] = (
    "aries",
    "taurus",
    "gemini",
    "cancer",
    "leo",
    "virgo",
    "libra",
    "scorpio",
    "sagittarius",
    "capricorn",
    "aquarius",
    "pisces",
)
BODIES: Final[tuple[str, ...]] = (
    "sun",
    "moon",
    "mercury",
    "venus",
    "mars",
    "jupiter",
    "saturn",
    "uranus",
    "neptune",
    "pluto",
)
ASPECT_KINDS: Final[tuple[str, ...]] = ("conjunction", "sextile", "square", "trine", "opposition")
HOUSES: Final[tuple[int, ...]] = tuple(range(1, 13))

# The Sun and the Moon never appear to move backwards, so only these can be retrograde.
RETROGRADE_BODIES: Final[tuple[str, ...]] = BODIES[2:]

SIGN_NAMES: Final[dict[str, str]] = {sign: sign.capitalize() for sign in SIGNS}

HOUSE_ORDINALS: Final[dict[int, str]] = {
    1: "first",
    2: "second",
    3: "third",
    4: "fourth",
    5: "fifth",
    6: "sixth",
    7: "seventh",
    8: "eighth",
    9: "ninth",
    10: "tenth",
    11: "eleventh",
    12: "twelfth",
}

# Modern rulerships: the outer planets take Scorpio, Aquarius and Pisces, which is what most
# readers of contemporary astrology expect to see.
SIGN_RULERS: Final[dict[str, str]] = {
    "aries": "mars",
    "taurus": "venus",
    "gemini": "mercury",
    "cancer": "moon",
    "leo": "sun",
    "virgo": "mercury",
    "libra": "venus",
    "scorpio": "pluto",
    "sagittarius": "jupiter",
    "capricorn": "saturn",
    "aquarius": "uranus",
    "pisces": "neptune",
}

# Bodies

BODY_NAMES: Final[dict[str, str]] = {
    "sun": "the Sun",
    "moon": "the Moon",
    "mercury": "Mercury",
    "venus": "Venus",
    "mars": "Mars",
    "jupiter": "Jupiter",
    "saturn": "Saturn",
    "uranus": "Uranus",
    "neptune": "Neptune",
    "pluto": "Pluto",
}
"""How each body is named mid-sentence; capitalise for the start of one."""

# Each principle is a singular noun phrase starting with 'your', so that it reads correctly
# both alone ('your drive is on public view') and paired ('your drive and your imagination').
PRINCIPLES: Final[dict[str, str]] = {
    "sun": "your sense of self",
    "moon": "your emotional life",
    "mercury": "your way of thinking",
    "venus": "your way of loving",
    "mars": "your drive",
    "jupiter": "your sense of possibility",
    "saturn": "your sense of duty",
    "uranus": "your need for freedom",
    "neptune": "your imagination",
    "pluto": "your power to transform",
}
"""What each of the ten bodies stands for in a life."""

RETROGRADE: Final[dict[str, str]] = {
    "mercury": (
        "Mercury was retrograde when you were born, so your thinking works best in second drafts: "
        "you revisit, reconsider and often reach the sharper idea later than everyone else."
    ),
    "venus": (
        "Venus was retrograde at your birth, which turns affection inward; you may take longer to "
        "trust, and you weigh what you value against what you were taught to value, loving more "
        "deliberately for it."
    ),
    "mars": (
        "With Mars retrograde, your drive tends to simmer before it acts, and you often do your "
        "best work when you return, better prepared, to a fight you once walked away from."
    ),
    "jupiter": (
        "Jupiter was retrograde when you were born, which suggests that your luck and faith are "
        "home-grown: growth comes from a philosophy you build yourself rather than one you "
        "inherit."
    ),
    "saturn": (
        "Saturn was retrograde at your birth, so the rules you live by are ones you have had to "
        "write for yourself, often after discovering that the ones you were handed did not fit."
    ),
    "uranus": (
        "With Uranus retrograde, your rebellion is turned inward; the revolutions you lead are "
        "mostly quiet ones, in how you think, long before they show on the outside."
    ),
    "neptune": (
        "Neptune was retrograde when you were born, so your imagination and spiritual hunger face "
        "inward, and dreams and intuition speak to you more clearly in private than in public."
    ),
    "pluto": (
        "With Pluto retrograde, your power to transform points at yourself first: the deepest "
        "changes in your life begin as private reckonings."
    ),
}
"""One sentence on what a retrograde birth placement adds, per body that can retrograde."""

# Sign placements. Sun, Moon, Ascendant and Midheaven paragraphs carry a section on their
# own (two or three sentences); Venus, Mars and Saturn ones are two sentences, leaving room
# for the house sentence and a retrograde note within four.

SUN_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "You are built to begin. There is a spark in you that would rather act and learn than wait "
        "and wonder, and your courage is most convincing when it is spontaneous. Patience may be a "
        "lifelong apprenticeship, but your gift is that you make the first move while everyone "
        "else is still deciding."
    ),
    "taurus": (
        "Your strength is the slow, sure kind. You trust what you can touch, taste and build with "
        "your own hands, and once you commit to something — a person, a place, a plan — you hold "
        "on with a loyalty that outlasts fashions. People feel calmer around you, because you "
        "remind them that good things take time."
    ),
    "gemini": (
        "Your mind is both your playground and your compass. You come alive in conversation, "
        "collecting ideas, stories and people with a curiosity that rarely runs dry, and you can "
        "see at least two sides of every question. Choosing is your challenge; your gift is that "
        "you keep the world interesting for everyone near you."
    ),
    "cancer": (
        "At your core is a protector. You feel your way through life, remembering what others "
        "forget and sensing moods before they are spoken, and the people you love become your home "
        "as much as any house. Your shell is real, but so is the tenderness it keeps safe."
    ),
    "leo": (
        "You were made to shine, and to help others shine too. Warm, loyal and openly expressive, "
        "you bring a sense of occasion to ordinary days, and your generosity is most alive when it "
        "is seen and returned. Learning that you are loved even off-stage is the quiet lesson "
        "beneath all the applause."
    ),
    "virgo": (
        "You are happiest when you are being useful. Where others see chaos you see the small, "
        "practical steps that would make things better, and your care shows itself in details — "
        "the fixed hinge, the checked figure, the remembered appointment. Be as gentle with your "
        "own imperfections as you are patient with other people's."
    ),
    "libra": (
        "You seek harmony, and you have an eye for it everywhere — in a room, a sentence, a "
        "friendship. Fairness matters to you deeply, and you are often the one who can hear both "
        "sides and find the elegant middle. Your growth lies in trusting that your own preference "
        "counts as much as keeping the peace."
    ),
    "scorpio": (
        "You live at depth. Surface answers never satisfy you; you want to know what is really "
        "going on, in people and in yourself, and you are willing to walk through fire to find "
        "out. Your loyalty is fierce, your instincts are sharp, and you have a rare capacity to "
        "come back from loss transformed."
    ),
    "sagittarius": (
        "You are a seeker at heart. Restless for horizons — on a map, in a book, in a conversation "
        "that runs until dawn — you are happiest when life feels like a journey with a meaning. "
        "Your honesty can be blunt, but it comes from an optimism that truly believes the truth "
        "will set everyone free."
    ),
    "capricorn": (
        "You are playing a long game. Ambitious in the quiet, durable way, you climb step by step "
        "and shoulder responsibilities others avoid, and you often grow more relaxed and playful "
        "with age. Your dry humour is the side door into a warmer heart than most people suspect."
    ),
    "aquarius": (
        "You think for yourself, and you think about everyone. Independent to the bone, you are "
        "drawn to ideas, friendships and causes that point toward a better future, and you are not "
        "easily impressed by 'the way things have always been done'. Closeness can feel "
        "complicated, yet your loyalty to your people runs deep."
    ),
    "pisces": (
        "You are porous to the world, and that is your gift. Imaginative, compassionate and "
        "intuitive, you pick up what others feel and often understand it before they do, and art, "
        "music or spirit may be where you feel most yourself. Good boundaries will not shrink your "
        "kindness — they protect it."
    ),
}
"""The Sun by sign: identity, purpose, what makes you feel most yourself."""

MOON_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "Your feelings arrive fast and hot, and they usually leave just as quickly. You need the "
        "freedom to react honestly and room to follow an impulse, and you feel safest when you are "
        "doing something rather than waiting. Anger clears the air for you; it is rarely where you "
        "stay."
    ),
    "taurus": (
        "Emotionally, you need steadiness: good food, familiar rooms, soft fabrics and people who "
        "show up when they say they will. The Moon is exalted here, so your instincts tend to be "
        "calm and trustworthy, and it takes a great deal to shake you. Change comes hard, but what "
        "you love, you love for good."
    ),
    "gemini": (
        "You process feelings by putting them into words. Talking, writing or simply thinking out "
        "loud helps you understand what is stirring inside, and you need lively minds around you "
        "to feel at ease. Boredom can unsettle you more than conflict ever does."
    ),
    "cancer": (
        "The Moon rules Cancer, so your emotional tides run deep and strong, and you feel most "
        "alive when you are looking after someone or being looked after. Memory, family and home "
        "carry unusual weight for you, and your intuition about people is often uncannily right. "
        "Learning to nourish yourself as generously as you nourish others is part of the path."
    ),
    "leo": (
        "You need to feel seen, and there is nothing shallow about that. When your heart is warmed "
        "by appreciation you give it back tenfold, with loyalty, play and an unmistakable "
        "generosity of spirit. Wounded pride stings, so honest affection is the best medicine "
        "anyone can offer you."
    ),
    "virgo": (
        "You soothe yourself by making sense of things — tidying, planning, helping, improving. "
        "Feelings become manageable once they have a practical task attached, and you show love "
        "through quiet acts of service that are easy to overlook. Let yourself be cared for in "
        "return, even when it is not done perfectly."
    ),
    "libra": (
        "You feel most at peace when your relationships are in balance. Discord unsettles you "
        "deeply, and you have a gift for smoothing tensions and making people feel understood. The "
        "work is to notice your own needs early, before keeping everyone else happy leaves you "
        "quietly depleted."
    ),
    "scorpio": (
        "Your feelings are intense, private and utterly sincere. You need emotional honesty above "
        "all — half-truths unsettle you — and you trust slowly because you bond so deeply. Once "
        "you let someone in, your devotion becomes a source of tremendous strength for you both."
    ),
    "sagittarius": (
        "You need space to breathe and something to look forward to. Your mood lifts with "
        "movement, humour and a fresh idea, and you recover from setbacks by finding out what they "
        "meant. Feeling fenced in is the quickest way to make you restless."
    ),
    "capricorn": (
        "You hold your feelings with care and a certain reserve, preferring to handle difficulties "
        "on your own. Security, for you, comes from competence and from knowing you can rely on "
        "yourself, and you may have carried responsibility from an early age. Softness is not "
        "weakness; allowing it is one of your great strengths."
    ),
    "aquarius": (
        "You need a little distance to understand what you feel. Friendship nourishes you as much "
        "as romance does, and you are most at ease with people who let you be unconventional. Your "
        "compassion reaches toward the whole of humanity, even when a single tear at close range "
        "makes you shy."
    ),
    "pisces": (
        "Your emotional world is vast, dreamy and absorbent. You feel what others feel, sometimes "
        "before you realise it is not yours, and you need regular solitude, music or water to find "
        "your way back to yourself. Your empathy is a gift that only grows stronger with gentle "
        "boundaries."
    ),
}
"""The Moon by sign: feelings, needs and what makes you feel safe."""

ASCENDANT_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "You meet the world head-on. People notice your directness and energy at once, and you "
        "tend to walk into a room as if there is something to be done there — often there is. "
        "First impressions of you are vivid, brave and just a little impatient."
    ),
    "taurus": (
        "You come across as calm, grounded and easy to be around. There is something reassuring in "
        "your presence, a slowness that is not dullness but steadiness, and people often trust you "
        "before they know why. You take your time to warm up, and you are worth the wait."
    ),
    "gemini": (
        "The first thing people notice about you is your quickness: bright eyes, a ready question, "
        "a conversation that jumps tracks with delight. You come across as young at heart and "
        "endlessly curious, and you make strangers feel like interesting company."
    ),
    "cancer": (
        "You approach life with gentle caution, testing the water before diving in. People sense "
        "your kindness and protectiveness quickly, and they often confide in you within minutes of "
        "meeting. Your manner shifts with your mood, like the Moon you answer to."
    ),
    "leo": (
        "You have presence. Even on a quiet day, something in your bearing — the warmth of your "
        "smile, the way you carry yourself — draws the eye, and people half expect you to lead. "
        "You are at your best when that light is turned outward to make others feel welcome."
    ),
    "virgo": (
        "You come across as thoughtful, observant and quietly capable. People notice your eye for "
        "detail and your modesty, and they often ask for your help because you seem to know how "
        "things ought to work. Beneath the composed exterior beats a very kind heart."
    ),
    "libra": (
        "You greet the world with grace and charm. Courteous and good-humoured, you put people at "
        "ease by instinct and look for the common ground in any situation. Others see you as a "
        "natural diplomat, sometimes long before you see yourself that way."
    ),
    "scorpio": (
        "You come across as magnetic and self-contained, with a gaze that seems to take in more "
        "than it gives away. People sense your intensity even when you are silent, and they rarely "
        "forget meeting you. You reveal yourself slowly, and only to those who have earned it."
    ),
    "sagittarius": (
        "You meet life with an open door and a grin. People see you as friendly, frank and "
        "adventurous — the one most likely to suggest the trip, the new idea or the joke that "
        "breaks the tension. Your enthusiasm is contagious, and it opens doors wherever you go."
    ),
    "capricorn": (
        "You present a composed, capable face to the world, and people often assume you are older "
        "or more in charge than you are. You measure situations before committing, and your "
        "reserve hides a wonderfully wry sense of humour. Life has a way of getting easier for you "
        "as the years go on."
    ),
    "aquarius": (
        "You come across as original, friendly and a little hard to pin down. People notice your "
        "independence and your appetite for ideas, and you are often the one asking the question "
        "nobody else thought of. You make friends easily, and always on your own terms."
    ),
    "pisces": (
        "You meet the world softly. People sense your sensitivity and imagination, and your "
        "gentle, slightly dreamy manner makes you easy to talk to — strangers may tell you their "
        "life stories. You take on the colour of your surroundings, so choose them with care."
    ),
}
"""The rising sign: manner, first impressions, how you meet life."""

VENUS_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "You love boldly and often at first sight, and you are drawn to people with spark and "
        "nerve. The chase thrills you, and a relationship stays alive for you as long as it keeps "
        "a little of that first adventure."
    ),
    "taurus": (
        "Venus is at home here, and you love with all five senses — through touch, good meals, "
        "beautiful things and unhurried time together. You are loyal and patient in affection, and "
        "you want a partner you can build a lasting life with."
    ),
    "gemini": (
        "You fall for minds first. Wit, conversation and shared curiosity are your love language, "
        "and a partner who can keep surprising you will keep your heart."
    ),
    "cancer": (
        "You love protectively and tenderly, and you show it by taking care of people: feeding "
        "them, remembering, making a home. Emotional safety is the foundation you need before you "
        "can truly open up."
    ),
    "leo": (
        "You love generously, romantically and out loud. Grand gestures come naturally to you, and "
        "you flourish in a relationship where affection and admiration flow both ways."
    ),
    "virgo": (
        "You show love through thoughtful, practical devotion — the mended tap, the packed lunch, "
        "the honest advice. You are discerning about partners, and once you trust someone, your "
        "care is steady and real."
    ),
    "libra": (
        "Venus rules Libra, so your feeling for beauty and partnership is refined and strong. You "
        "thrive in relationships built on courtesy, fairness and true companionship, and you have "
        "a gift for making the people you love feel chosen."
    ),
    "scorpio": (
        "You love with intensity and want nothing less than the whole truth of another person. "
        "Casual connections rarely satisfy you; trust is everything, and once it is given, your "
        "devotion runs very deep."
    ),
    "sagittarius": (
        "You love freely and generously, and you are drawn to people who widen your world. A "
        "partner who is also a fellow traveller — in ideas, in humour or in actual miles — will "
        "keep you close."
    ),
    "capricorn": (
        "You take love seriously and build it to last. You may be cautious at first, but you show "
        "affection through commitment, reliability and effort, and your relationships tend to "
        "deepen with every year."
    ),
    "aquarius": (
        "You need friendship at the heart of love, and plenty of room to be yourself. You are "
        "attracted to the unusual and the independent, and you love most loyally when no one asks "
        "you to conform."
    ),
    "pisces": (
        "Venus is exalted here, and you love with boundless compassion and imagination. You see "
        "the best in people, sometimes more than is there, and your ideal is a soulful, almost "
        "spiritual kind of union."
    ),
}
"""Venus by sign: how you love, what you find beautiful."""

MARS_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "Mars is at home here, giving you quick reflexes, raw courage and an instinct to act first "
        "and think later. You thrive on challenge and competition, and your energy burns brightest "
        "at the start of things."
    ),
    "taurus": (
        "Your drive is slow to start and almost impossible to stop. You work steadily, you refuse "
        "to be hurried, and your determination is a kind of strength that others underestimate at "
        "their peril."
    ),
    "gemini": (
        "You act through words and ideas, and your energy likes to juggle several projects at "
        "once. Debate sharpens you; the challenge is to finish as brilliantly as you begin."
    ),
    "cancer": (
        "You fight hardest for the people and places you love. Your drive runs on feeling, so you "
        "are at your most powerful when protecting something, and more indirect when defending "
        "yourself."
    ),
    "leo": (
        "You pursue your goals with pride, flair and a big heart. You want your efforts to mean "
        "something and to be noticed, and your courage is at its finest when it is generous."
    ),
    "virgo": (
        "Your energy is precise and practical: you get things done by breaking them into steps and "
        "doing each one well. Frustration tends to leak out as criticism, so give your drive a "
        "real problem to solve."
    ),
    "libra": (
        "You act through cooperation and negotiation, preferring persuasion to force. Open "
        "confrontation may feel uncomfortable, yet you will stand up fiercely for what is fair."
    ),
    "scorpio": (
        "Your will is deep, focused and strategic. You rarely show all your cards, and when you "
        "commit to a goal you pursue it with an endurance that can outlast almost anyone."
    ),
    "sagittarius": (
        "Your energy is fuelled by purpose and adventure. You move fast when you believe in "
        "something, and you need a big goal and plenty of freedom to stay motivated."
    ),
    "capricorn": (
        "Mars is exalted here, giving you disciplined, ambitious and remarkably efficient energy. "
        "You know how to aim your effort at a distant summit and keep climbing until you stand on "
        "it."
    ),
    "aquarius": (
        "You channel your drive into ideas, reform and collective effort. You work best on your "
        "own terms, and you fight hardest for a cause that is bigger than yourself."
    ),
    "pisces": (
        "Your drive works like water, quietly finding its way around obstacles rather than "
        "smashing through them. You are moved to act by compassion and inspiration, and you do "
        "your best work when you believe in it."
    ),
}
"""Mars by sign: how you go after what you want."""

SATURN_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "Saturn here asks you to be patient with your own impulses and to build courage slowly "
        "rather than all at once. Self-reliance is hard-won for you, and once you have it, it is "
        "unshakeable."
    ),
    "taurus": (
        "Your lessons revolve around security — money, possessions and the quiet question of what "
        "you are worth. By building slowly and sensibly you can lay a foundation that will hold "
        "for a lifetime."
    ),
    "gemini": (
        "You may once have doubted your intelligence or your voice, and so you take learning and "
        "communication unusually seriously. With time, your words come to carry real weight and "
        "authority."
    ),
    "cancer": (
        "Saturn here can make emotional safety feel like something to be earned, perhaps because "
        "early home life asked you to grow up fast. Your reward is the ability to build a family "
        "or a home that truly shelters others."
    ),
    "leo": (
        "Recognition may have felt like something you had to earn, and so your creative confidence "
        "grows slowly. When it arrives it is real, and you become a steady, dignified source of "
        "warmth for others."
    ),
    "virgo": (
        "You hold yourself to exacting standards of work and health, and perfectionism is the trap "
        "to watch for. Mastery comes when you learn that 'good and finished' often serves better "
        "than 'perfect and pending'."
    ),
    "libra": (
        "Saturn is exalted here, and your lessons come through relationships, fairness and "
        "commitment. You take partnership seriously, and you carry a mature, principled sense of "
        "justice."
    ),
    "scorpio": (
        "Your tests concern trust, control and the things you cannot share lightly. Facing your "
        "fears head-on gives you a depth of resilience that few people possess."
    ),
    "sagittarius": (
        "You question beliefs carefully rather than taking them on faith, and you may have had to "
        "fight for your education or your philosophy. The wisdom you build is practical, tested "
        "and entirely your own."
    ),
    "capricorn": (
        "Saturn is at home here, lending you structure, ambition and a natural sense of "
        "responsibility. Your challenge is to let success be enough, and to rest now and then "
        "along the climb."
    ),
    "aquarius": (
        "As the traditional ruler of Aquarius, Saturn gives your ideals a backbone, and you can "
        "build real structures for communities and causes. Your lesson is belonging: finding where "
        "you fit without giving up what makes you different."
    ),
    "pisces": (
        "Your lessons concern boundaries, faith and trusting what you cannot see. Structure gives "
        "your sensitivity a container, and within it your compassion becomes a steady, practical "
        "force."
    ),
}
"""Saturn by sign: where life asks for patience, and rewards it."""

MIDHEAVEN_SIGNS: Final[dict[str, str]] = {
    "aries": (
        "Your calling is to lead from the front. Careers that reward initiative, competition and "
        "nerve suit you — founding ventures, sport, emergency work, anything where being first "
        "matters. You do best when you are allowed to start things and hand over the upkeep."
    ),
    "taurus": (
        "You are drawn to work that produces something tangible and lasting. Finance, food, "
        "design, building or the land may call to you, and your reputation rests on reliability. "
        "Slow, patient growth will take you further than any shortcut."
    ),
    "gemini": (
        "Your public path runs through communication. Writing, teaching, media, sales or any job "
        "where information moves quickly can suit you, and variety keeps you engaged. You may wear "
        "several professional hats over the years, and that versatility is a strength."
    ),
    "cancer": (
        "You are called to care for others in a public way. Nursing, hospitality, education, "
        "property or any role that builds a sense of home can be fulfilling, and you lead by "
        "nurturing. Your standing grows from the trust people place in you."
    ),
    "leo": (
        "You are meant to be seen doing what you love. Creative, performing or leadership roles "
        "suit you, and you shine where your personal warmth and flair are part of the job. "
        "Recognition fuels you, and you give generously to the teams you lead."
    ),
    "virgo": (
        "Your vocation is built on skill and service. Health, analysis, editing, craft or any role "
        "where precision makes a real difference can suit you well. You earn respect by being the "
        "person who gets it right."
    ),
    "libra": (
        "Your career thrives on partnership and people skills. Law, diplomacy, design, the arts or "
        "mediation may suit you, and you do well in roles that call for tact, taste and a sense of "
        "fairness. Your reputation is often built on how you make others feel."
    ),
    "scorpio": (
        "You are drawn to work with depth and consequence. Research, psychology, finance, medicine "
        "or investigation may call to you, and you are comfortable handling what others avoid. "
        "Your career may pass through dramatic reinventions, each one leaving you more formidable."
    ),
    "sagittarius": (
        "Your calling involves meaning, learning and wide horizons. Teaching, publishing, travel, "
        "law or philosophy can suit you, and you need work that feels as if it matters. You are "
        "respected for your vision and your candour."
    ),
    "capricorn": (
        "Capricorn is the Midheaven's natural sign, and you have an instinct for structure, "
        "authority and achievement. Management, government, engineering or any field with a clear "
        "ladder to climb can reward your patience. Your reputation is built one solid rung at a "
        "time."
    ),
    "aquarius": (
        "You are called to innovate. Technology, science, social causes or any work that points "
        "toward the future suits you, and you do well in networks and teams. Your career may take "
        "unconventional turns, and that is part of its meaning."
    ),
    "pisces": (
        "Your vocation asks for imagination and compassion. The arts, healing, spiritual work, "
        "film or charity can all call to you, and you do your finest work when you feel inspired. "
        "Your path may be less linear than other people's, guided more by intuition than by plans."
    ),
}
"""The Midheaven by sign: calling, career and public standing."""

# An image for each sign, used to sum up the Sun, Moon and rising signs in one line.
SIGN_ARCHETYPES: Final[dict[str, str]] = {
    "aries": "a pioneer",
    "taurus": "a gardener",
    "gemini": "a messenger",
    "cancer": "a guardian",
    "leo": "a performer",
    "virgo": "a craftsperson",
    "libra": "a diplomat",
    "scorpio": "an alchemist",
    "sagittarius": "an explorer",
    "capricorn": "a mountaineer",
    "aquarius": "an inventor",
    "pisces": "a dreamer",
}
"""A figure that stands for each sign, with its article."""

# Houses. Each sentence has one ``{focus}`` slot for a body's principle and never starts with
# it, so the principle stays lowercase and the sentence reads the same for any body.

HOUSE_SENTENCES: Final[dict[int, str]] = {
    1: (
        "In the first house, {focus} sits right on the surface, so people meet it before they even "
        "learn your name."
    ),
    2: (
        "The second house ties {focus} to what you own and what you value, and money, comfort and "
        "self-worth are where it is most often tested."
    ),
    3: (
        "From the third house, {focus} runs through conversation, siblings, neighbours and the "
        "errands of daily life; you come to understand it by talking it through."
    ),
    4: (
        "Tucked into the fourth house, {focus} is rooted in home and family, and it grows stronger "
        "the more secure the ground beneath you feels."
    ),
    5: (
        "The fifth house gives {focus} a stage: romance, play, children and creative work are "
        "where it comes most alive."
    ),
    6: (
        "In the sixth house, {focus} shows itself in routines, health and the work you do every "
        "day, in the care you take over small things."
    ),
    7: (
        "The seventh house turns {focus} toward other people, so partners, close collaborators and "
        "even rivals are the mirrors that show it to you."
    ),
    8: (
        "Placed in the eighth house, {focus} runs deep, through intimacy, shared resources and the "
        "crises that change you for good."
    ),
    9: (
        "The ninth house sends {focus} travelling — through study, faith, foreign places and the "
        "big questions about meaning."
    ),
    10: (
        "In the tenth house, {focus} is on public view, bound up with your career, your reputation "
        "and the mark you want to leave."
    ),
    11: (
        "The eleventh house links {focus} to friends, groups and causes, and it thrives when it is "
        "shared with people who want the same future."
    ),
    12: (
        "Hidden in the twelfth house, {focus} works quietly behind the scenes, in solitude, dreams "
        "and private kindnesses, and it may take time to recognise as your own."
    ),
}
"""What a body's placement in each house adds, as one sentence."""

HOUSE_DOMAINS: Final[dict[int, str]] = {
    1: "self-discovery and the way you show up",
    2: "money, possessions and self-worth",
    3: "learning, conversation and your local world",
    4: "home, family and roots",
    5: "creativity, romance and play",
    6: "daily work, health and service",
    7: "partnership and one-to-one relationships",
    8: "intimacy, shared resources and transformation",
    9: "travel, study and the search for meaning",
    10: "career, reputation and public life",
    11: "friendship, community and shared hopes",
    12: "solitude, the inner life and quiet service",
}
"""The areas of life each house governs, as a phrase."""

# Slots: ruler (already capitalised), sign, house (ordinal), domain.
RULER_SENTENCE: Final = (
    "{ruler} rules your rising sign, and from {sign} in your {house} house it steers the whole "
    "chart toward {domain}."
)


class AspectText(NamedTuple):
    """How one kind of aspect is told.

    ``verb`` joins two body names ("the Sun squares Mars"). ``meanings`` have ``{first}`` and
    ``{second}`` slots for the two principles and say what the aspect does to them;
    ``advice`` says what to do with it. Two of each, so that two aspects of the same kind in
    one reading do not repeat each other.
    """

    verb: str
    meanings: tuple[str, str]
    advice: tuple[str, str]


ASPECTS: Final[dict[str, AspectText]] = {
    "conjunction": AspectText(
        verb="is conjunct",
        meanings=(
            (
                "In a conjunction the two fuse, so {first} and {second} act as a single force in "
                "you — hard to tell apart, and impossible to call on one without waking the other."
            ),
            (
                "Fused this closely, {first} and {second} speak with one voice, and whatever feeds "
                "one of them feeds both."
            ),
        ),
        advice=(
            (
                "It is a concentrated, emphatic signature, and learning where to aim it is most of "
                "the work."
            ),
            "Other people tend to notice this blend in you long before you notice it yourself.",
        ),
    ),
    "sextile": AspectText(
        verb="is sextile",
        meanings=(
            (
                "A sextile is an open door: {first} and {second} cooperate easily, each lending "
                "the other a useful talent."
            ),
            (
                "Linked by a sextile, {first} and {second} work together like friendly colleagues "
                "rather than rivals."
            ),
        ),
        advice=(
            (
                "The opportunity is real but quiet, and it comes alive when you deliberately put "
                "the two to work together."
            ),
            (
                "Small, conscious steps will make far more of this link than waiting for it to act "
                "on its own."
            ),
        ),
    ),
    "square": AspectText(
        verb="squares",
        meanings=(
            (
                "A square is friction, and here {first} and {second} pull in different directions, "
                "each wanting something the other finds inconvenient."
            ),
            (
                "Under this square, {first} and {second} keep testing each other, and neither can "
                "settle while the other is ignored."
            ),
        ),
        advice=(
            (
                "It can feel like an inner argument, but it is also an engine: much of your drive "
                "to achieve is born here."
            ),
            (
                "The tension never fully goes away, and it is not meant to; handled well, it "
                "becomes skill earned the hard way."
            ),
        ),
    ),
    "trine": AspectText(
        verb="is trine",
        meanings=(
            (
                "A trine is a natural gift: {first} and {second} flow together so smoothly that "
                "you may not even recognise the pairing as a talent."
            ),
            (
                "In this trine, {first} and {second} share an element and a rhythm, supporting "
                "each other without being asked."
            ),
        ),
        advice=(
            (
                "Ease can breed complacency, so the gift grows most when you choose to use it on "
                "purpose."
            ),
            "It is the kind of grace others may envy, and it is worth claiming as yours.",
        ),
    ),
    "opposition": AspectText(
        verb="opposes",
        meanings=(
            (
                "An opposition sets {first} and {second} across the chart from each other, like "
                "two ends of a seesaw."
            ),
            (
                "Facing each other across the circle, {first} and {second} ask to be balanced "
                "rather than chosen between."
            ),
        ),
        advice=(
            (
                "You may swing from one to the other, or meet one side in the people around you; "
                "integration comes from holding both at once."
            ),
            (
                "Relationships often act this tension out for you, and each time you see it "
                "clearly, you reclaim a little more of both."
            ),
        ),
    ),
}

NO_ASPECTS: Final = (
    "No two planets in this chart form a close major aspect, which is rarer than you might think. "
    "Each planet works on its own terms, so your life may feel less like one tightly woven plot "
    "and more like a set of distinct, self-contained chapters — each of which you can master "
    "separately."
)
"""Said instead when no two bodies are in a major aspect."""

# Summary. Slots: sun, moon, rising (sign names) and their *_archetype figures.
SUMMARY_OPENING: Final = (
    "With the Sun in {sun}, the Moon in {moon} and {rising} rising, you shine like "
    "{sun_archetype}, feel like {moon_archetype} and meet the world like {rising_archetype}."
)

SUMMARY_CLOSINGS: Final[dict[str, str]] = {
    "natal": (
        "What follows reads each of those three in turn, then the aspects that bind your chart "
        "together."
    ),
    "love": (
        "Those three set the scene; Venus and Mars then speak to how you love and what you desire."
    ),
    "career": (
        "Those three set the scene; the Midheaven and Saturn then speak to your calling and the "
        "long work of building it."
    ),
}
"""The summary's second sentence, saying where each kind of reading goes next."""
