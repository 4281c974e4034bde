from rlhfkit.data.records import Message, Ranking, prompt_bucket, user


def test_prompt_bucket_is_stable_and_depends_only_on_the_prompt():
    assert prompt_bucket(user("hi")) == prompt_bucket(user("hi"))
    assert 0.0 <= prompt_bucket(user("hi")) < 1.0
    assert prompt_bucket(user("hi")) != prompt_bucket(user("hi!"))
    assert prompt_bucket(user("hi")) != prompt_bucket((Message("system", "be brief"), Message("user", "hi")))
    buckets = [prompt_bucket(user(f"question {i}")) for i in range(2000)]
    assert 0.12 < sum(b < 0.15 for b in buckets) / len(buckets) < 0.18  # roughly uniform


def test_ranking_pairs_skip_ties_and_best_worst():
    r = Ranking(user("q"), ("a", "b", "c"), (1, 0, 1))
    assert sorted(r.pairs()) == [(1, 0), (1, 2)]
    bw = r.best_worst()
    assert bw.chosen == "b" and bw.rejected in ("a", "c")
    assert Ranking(user("q"), ("a", "b"), (0, 0)).best_worst() is None
