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


def test_ppo_stats_log_the_mean_of_each_diagnostic_over_updates():
    from rlhfkit.records import PPOStats

    stats = PPOStats()
    assert stats.means()["ratio"] == 0.0  # no update yet (all skipped): 0, not a division error
    stats.ratio += [1.0, 1.2]
    stats.clipfrac += [0.0, 0.5, 0.25]
    means = stats.means()
    assert means["ratio"] == 1.1 and means["clipfrac"] == 0.25
    assert set(means) == {"pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac", "ptx_loss"}
