//! Whole rounds of SecAgg+ between real clients and the server: exact sums under
//! dropouts, clean failure past the threshold, and refusal of bad messages.

use std::collections::BTreeMap;

use nanofleet_secagg::{
    Aggregate, Client, ClientId, ClientMessage, Config, EncryptedShare, MaskedInput, Params,
    SecAggError, Server, Stage,
};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Round {
    clients: Vec<Client>,
    server: Server,
}

fn start(config: Config, seed: u64) -> Round {
    let params = Params::new(config).expect("test parameters are valid");
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let clients = (0..params.config().num_clients)
        .map(|id| Client::new(id, params.clone(), &mut rng).unwrap())
        .collect();
    Round {
        clients,
        server: Server::new(params).with_threads(2),
    }
}

/// Runs all four stages with ring inputs; a client listed in `drops` sends nothing from
/// that stage on.
fn run(
    round: &mut Round,
    inputs: &[Vec<u32>],
    drops: &BTreeMap<ClientId, Stage>,
) -> Result<Aggregate, SecAggError> {
    run_with(round, drops, |client, shares| {
        client.masked_input_encoded(shares, &inputs[client.id() as usize])
    })
}

/// Runs all four stages, `masked_input` making each client's stage-3 message.
fn run_with(
    round: &mut Round,
    drops: &BTreeMap<ClientId, Stage>,
    masked_input: impl Fn(&mut Client, &[EncryptedShare]) -> Result<MaskedInput, SecAggError>,
) -> Result<Aggregate, SecAggError> {
    let sends = |id: ClientId, stage: Stage| drops.get(&id).is_none_or(|&d| stage < d);
    let server = &mut round.server;
    for client in round
        .clients
        .iter_mut()
        .filter(|c| sends(c.id(), Stage::AdvertiseKeys))
    {
        server.receive(ClientMessage::AdvertiseKeys(client.advertise()?))?;
    }
    server.close_stage()?;
    for client in round
        .clients
        .iter_mut()
        .filter(|c| sends(c.id(), Stage::ShareKeys))
    {
        let keys = server.advertised_keys_for(client.id())?;
        server.receive(ClientMessage::ShareKeys(client.share_keys(&keys)?))?;
    }
    server.close_stage()?;
    for client in round
        .clients
        .iter_mut()
        .filter(|c| sends(c.id(), Stage::MaskedInput))
    {
        let shares = server.shares_for(client.id())?;
        server.receive(ClientMessage::MaskedInput(masked_input(client, &shares)?))?;
    }
    server.close_stage()?;
    for client in round
        .clients
        .iter_mut()
        .filter(|c| sends(c.id(), Stage::Unmask))
    {
        let request = server.unmask_request_for(client.id())?;
        server.receive(ClientMessage::Unmask(client.unmask(&request)?))?;
    }
    Ok(server
        .close_stage()?
        .expect("closing unmask yields the aggregate"))
}

fn plain_sum(inputs: &[Vec<u32>], contributors: &[ClientId], modulus_bits: u32) -> Vec<u32> {
    let mask = u32::MAX >> (32 - modulus_bits);
    let mut sum = vec![0u32; inputs[0].len()];
    for &c in contributors {
        for (s, v) in sum.iter_mut().zip(&inputs[c as usize]) {
            *s = s.wrapping_add(*v);
        }
    }
    sum.iter().map(|s| s & mask).collect()
}

const STAGES: [Stage; 4] = [
    Stage::AdvertiseKeys,
    Stage::ShareKeys,
    Stage::MaskedInput,
    Stage::Unmask,
];

/// A random round: `(config, inputs, seed)` with a full or ring graph.
fn round_strategy() -> impl Strategy<Value = (Config, Vec<Vec<u32>>, u64)> {
    (
        2u32..=12,
        2u32..=12,
        any::<u32>(),
        1usize..=24,
        4u32..=32,
        any::<u64>(),
    )
        .prop_flat_map(|(n, k_raw, t_raw, len, bits, seed)| {
            let k_raw = k_raw.min(n);
            let k = if k_raw == n || k_raw % 2 == 1 {
                k_raw
            } else if k_raw + 1 < n {
                k_raw + 1
            } else {
                n
            };
            let mut config = Config::new(n, len);
            config.group_size = k;
            config.threshold = 2 + t_raw % (k - 1);
            config.modulus_bits = bits;
            config.quantization_range = 1;
            config.graph_seed = seed.to_le_bytes().repeat(4).try_into().unwrap();
            config.round = seed % 1000;
            let mask = u32::MAX >> (32 - bits);
            let inputs = proptest::collection::vec(
                proptest::collection::vec(any::<u32>().prop_map(move |v| v & mask), len),
                n as usize,
            );
            (Just(config), inputs, Just(seed))
        })
}

/// `count` distinct clients, each dropping at a random stage.
fn drop_plan(n: u32, count: usize, seed: u64) -> BTreeMap<ClientId, Stage> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0xd0d0);
    let mut ids: Vec<ClientId> = (0..n).collect();
    ids.shuffle(&mut rng);
    ids.into_iter()
        .take(count)
        .map(|id| (id, *STAGES.choose(&mut rng).unwrap()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn sum_is_exact_with_up_to_tolerated_dropouts(
        (config, inputs, seed) in round_strategy(),
        drop_fraction in 0.0f64..=1.0,
    ) {
        let tolerated = (config.group_size - config.threshold) as usize;
        let count = (drop_fraction * tolerated as f64).round() as usize;
        let drops = drop_plan(config.num_clients, count, seed);
        let bits = config.modulus_bits;
        let mut round = start(config, seed);
        let aggregate = run(&mut round, &inputs, &drops).unwrap();
        let contributors: Vec<ClientId> = (0..inputs.len() as ClientId)
            .filter(|c| drops.get(c).is_none_or(|&s| s == Stage::Unmask))
            .collect();
        prop_assert_eq!(aggregate.contributors(), &contributors[..]);
        prop_assert_eq!(aggregate.sum(), &plain_sum(&inputs, &contributors, bits)[..]);
    }

    #[test]
    fn too_few_shares_fail_the_round_cleanly(
        (config, inputs, seed) in round_strategy(),
        stage_index in 1usize..4,
    ) {
        // Drop one more than tolerated, all within client 0's neighbourhood.
        let params = Params::new(config.clone()).unwrap();
        let mut neighbourhood: Vec<ClientId> = params.graph().neighbours(0).to_vec();
        neighbourhood.push(0);
        let count = (config.group_size - config.threshold + 1) as usize;
        let drops: BTreeMap<ClientId, Stage> =
            neighbourhood.into_iter().take(count).map(|id| (id, STAGES[stage_index])).collect();
        let mut round = start(config, seed);
        let error = run(&mut round, &inputs, &drops).unwrap_err();
        prop_assert!(
            matches!(error, SecAggError::TooFewSurvivors { .. } | SecAggError::NotEnoughShares { .. } | SecAggError::NoClients(_)),
            "unexpected error {:?}", error
        );
        // The failed round refuses everything after.
        prop_assert!(matches!(round.server.close_stage(), Err(SecAggError::RoundFailed(_))));
    }

    #[test]
    fn tampered_share_is_rejected_by_its_recipient(
        seed in any::<u64>(),
        byte in 0usize..96,
        bit in 0u8..8,
    ) {
        let mut round = start(Config::new(4, 3), seed);
        let server = &mut round.server;
        for client in &mut round.clients {
            server.receive(ClientMessage::AdvertiseKeys(client.advertise().unwrap())).unwrap();
        }
        server.close_stage().unwrap();
        for client in &mut round.clients {
            let keys = server.advertised_keys_for(client.id()).unwrap();
            server.receive(ClientMessage::ShareKeys(client.share_keys(&keys).unwrap())).unwrap();
        }
        server.close_stage().unwrap();
        let mut shares = server.shares_for(2).unwrap();
        let sender = shares[1].sender;
        shares[1].ciphertext[byte] ^= 1 << bit;
        prop_assert_eq!(
            round.clients[2].masked_input_encoded(&shares, &[1, 2, 3]).unwrap_err(),
            SecAggError::ShareAuthentication { sender, recipient: 2 }
        );
    }
}

/// Bad messages of every kind are refused one by one, and the round still ends with the
/// exact sum.
#[test]
fn bad_messages_are_refused_and_the_round_continues() {
    let mut config = Config::new(5, 4);
    config.round = 7;
    // A ring narrower than the 32-bit words, so that a word can lie outside it.
    config.modulus_bits = 24;
    config.quantization_range = 1 << 20;
    let inputs: Vec<Vec<u32>> = (0..5u32)
        .map(|c| vec![c, 10 * c, 100 * c, 1000 * c])
        .collect();
    let mut round = start(config.clone(), 1);
    let server = &mut round.server;

    let advertised: Vec<_> = round
        .clients
        .iter_mut()
        .map(|c| c.advertise().unwrap())
        .collect();
    let mut stale = advertised[0].clone();
    stale.round = 6;
    assert_eq!(
        server.receive(ClientMessage::AdvertiseKeys(stale)),
        Err(SecAggError::WrongRound {
            expected: 7,
            got: 6
        })
    );
    let mut stranger = advertised[0].clone();
    stranger.sender = 9;
    assert_eq!(
        server.receive(ClientMessage::AdvertiseKeys(stranger)),
        Err(SecAggError::UnknownClient(9))
    );
    let mut copied_key = advertised[1].clone();
    copied_key.mask_public_key = advertised[0].mask_public_key;
    for keys in &advertised {
        server
            .receive(ClientMessage::AdvertiseKeys(keys.clone()))
            .unwrap();
    }
    assert_eq!(
        server.receive(ClientMessage::AdvertiseKeys(advertised[3].clone())),
        Err(SecAggError::Duplicate(3))
    );
    assert_eq!(
        server.advertised_keys_for(0).unwrap_err(),
        SecAggError::NotAvailable("advertised keys")
    );
    server.close_stage().unwrap();
    assert_eq!(
        server.receive(ClientMessage::AdvertiseKeys(advertised[2].clone())),
        Err(SecAggError::WrongStage {
            expected: Stage::ShareKeys,
            got: Stage::AdvertiseKeys
        })
    );

    // A client that is handed a key list with a copied key refuses it.
    let mut keys_for_4 = server.advertised_keys_for(4).unwrap();
    keys_for_4[1] = copied_key;
    assert!(matches!(
        round.clients[4].share_keys(&keys_for_4),
        Err(SecAggError::Malformed { .. })
    ));

    let mut share_messages = Vec::new();
    for client in &mut round.clients {
        let keys = server.advertised_keys_for(client.id()).unwrap();
        share_messages.push(client.share_keys(&keys).unwrap());
    }
    let mut partial = share_messages[0].clone();
    partial.shares.pop();
    assert!(matches!(
        server.receive(ClientMessage::ShareKeys(partial)),
        Err(SecAggError::Malformed { sender: 0, .. })
    ));
    let mut forged = share_messages[0].clone();
    forged.shares[0].sender = 3;
    assert!(matches!(
        server.receive(ClientMessage::ShareKeys(forged)),
        Err(SecAggError::Malformed { sender: 0, .. })
    ));
    for message in &share_messages {
        server
            .receive(ClientMessage::ShareKeys(message.clone()))
            .unwrap();
    }
    assert_eq!(
        server.receive(ClientMessage::ShareKeys(share_messages[1].clone())),
        Err(SecAggError::Duplicate(1))
    );
    server.close_stage().unwrap();

    // Redirected and replayed shares fail at the recipient.
    let shares_for_1 = server.shares_for(1).unwrap();
    let mut redirected = server.shares_for(2).unwrap();
    redirected[0] = shares_for_1[0].clone();
    redirected[0].recipient = 2;
    assert!(matches!(
        round.clients[2].masked_input_encoded(&redirected, &inputs[2]),
        Err(SecAggError::ShareAuthentication { recipient: 2, .. })
    ));
    let mut twice = server.shares_for(2).unwrap();
    twice.push(twice[0].clone());
    assert!(matches!(
        round.clients[2].masked_input_encoded(&twice, &inputs[2]),
        Err(SecAggError::Duplicate(_))
    ));

    // Client 4 drops out during the masked-input stage.
    let mut masked = Vec::new();
    for client in round.clients.iter_mut().take(4) {
        let shares = server.shares_for(client.id()).unwrap();
        masked.push(
            client
                .masked_input_encoded(&shares, &inputs[client.id() as usize])
                .unwrap(),
        );
    }
    let mut short = masked[0].clone();
    short.values.pop();
    assert_eq!(
        server.receive(ClientMessage::MaskedInput(short)),
        Err(SecAggError::WrongLength {
            expected: 4,
            got: 3
        })
    );
    let mut too_wide = masked[0].clone();
    too_wide.values[2] = 1 << 24;
    assert!(matches!(
        server.receive(ClientMessage::MaskedInput(too_wide)),
        Err(SecAggError::OutOfRing { index: 2, .. })
    ));
    for message in &masked {
        server
            .receive(ClientMessage::MaskedInput(message.clone()))
            .unwrap();
    }
    assert_eq!(
        server.receive(ClientMessage::MaskedInput(masked[0].clone())),
        Err(SecAggError::Duplicate(0))
    );
    server.close_stage().unwrap();
    let mut late = masked[0].clone();
    late.sender = 4;
    assert!(matches!(
        server.receive(ClientMessage::MaskedInput(late)),
        Err(SecAggError::WrongStage { .. })
    ));
    assert_eq!(
        server.unmask_request_for(4).unwrap_err(),
        SecAggError::NotAParticipant(4)
    );

    let mut responses = Vec::new();
    for client in round.clients.iter_mut().take(4) {
        let request = server.unmask_request_for(client.id()).unwrap();
        assert_eq!(request.dropped, vec![4]);
        responses.push(client.unmask(&request).unwrap());
    }
    let mut swapped = responses[0].clone();
    std::mem::swap(
        &mut swapped.self_mask_seed_shares,
        &mut swapped.mask_key_shares,
    );
    assert!(matches!(
        server.receive(ClientMessage::Unmask(swapped)),
        Err(SecAggError::Malformed { sender: 0, .. })
    ));
    for response in responses {
        server.receive(ClientMessage::Unmask(response)).unwrap();
    }
    let aggregate = server.close_stage().unwrap().unwrap();
    assert_eq!(aggregate.sum(), &plain_sum(&inputs, &[0, 1, 2, 3], 32)[..]);
    assert_eq!(
        server.close_stage().unwrap_err(),
        SecAggError::RoundFinished
    );
}

#[test]
fn share_from_an_earlier_round_is_refused() {
    let mut config = Config::new(3, 2);
    config.threshold = 2;
    let mut old = start(config.clone(), 5);
    let inputs = vec![vec![1, 2]; 3];
    let keys: Vec<_> = old
        .clients
        .iter_mut()
        .map(|c| c.advertise().unwrap())
        .collect();
    let old_shares = old.clients[0].share_keys(&keys).unwrap();

    config.round = 1;
    let mut new = start(config, 6);
    let keys: Vec<_> = new
        .clients
        .iter_mut()
        .map(|c| c.advertise().unwrap())
        .collect();
    new.clients[1].share_keys(&keys).unwrap();
    let mut replayed = old_shares.shares[0].clone();
    assert_eq!(replayed.recipient, 1);
    replayed.round = 1;
    assert_eq!(
        new.clients[1]
            .masked_input_encoded(&[replayed], &inputs[1])
            .unwrap_err(),
        SecAggError::ShareAuthentication {
            sender: 0,
            recipient: 1
        }
    );
}

#[test]
fn float_inputs_decode_to_the_float_sum() {
    let mut config = Config::new(11, 1000);
    config.group_size = 5;
    config.threshold = 3;
    let mut round = start(config, 3);
    let floats: Vec<Vec<f32>> = (0..11)
        .map(|c| {
            (0..1000)
                .map(|i| ((c * 1000 + i) as f32 * 0.37).sin() * 3.0)
                .collect()
        })
        .collect();
    // Client 7 drops before sending its input.
    let drops = BTreeMap::from([(7, Stage::MaskedInput)]);
    let aggregate = run_with(&mut round, &drops, |client, shares| {
        client.masked_input(shares, &floats[client.id() as usize])
    })
    .unwrap();
    let decoded = aggregate.decode();
    let step = 16.0 / f64::from(1u32 << 22);
    for (i, got) in decoded.iter().enumerate() {
        let want: f64 = (0..11)
            .filter(|&c| c != 7)
            .map(|c| f64::from(floats[c][i]))
            .sum();
        assert!(
            (f64::from(*got) - want).abs() <= 10.0 * step + 1e-4,
            "index {i}: {got} vs {want}"
        );
    }
}
