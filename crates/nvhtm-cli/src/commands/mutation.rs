//! `nvhtm mutation`: the persistence mutation score of the whole project.

use nvhtm::mutation::{self, Suite};

use super::CommandResult;

/// Runs the named suites (all when none), prints the merged table (or JSON), and fails when a
/// site is missed or a baseline fails.
pub fn run(names: &[String], json: bool) -> CommandResult {
    let suites: Vec<&'static Suite> = if names.is_empty() {
        mutation::SUITES.iter().collect()
    } else {
        names
            .iter()
            .map(|name| {
                mutation::suite(name).ok_or_else(|| {
                    let known: Vec<&str> = mutation::SUITES.iter().map(|s| s.name).collect();
                    format!("no suite {name:?}; the suites are {}", known.join(", "))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let start = std::time::Instant::now();
    let table = mutation::run_suites(&suites);
    if json {
        println!("{}", serde_json::to_string_pretty(&table)?);
    } else {
        println!("{table}");
        println!("took {:.1} s", start.elapsed().as_secs_f64());
    }
    if let Some(failed) = table.suites.iter().find(|s| !s.baseline_passed) {
        return Err(format!("suite {}: the baseline fails, so its verdicts mean nothing", failed.name).into());
    }
    let missed = table.missed();
    if !missed.is_empty() {
        let sites: Vec<String> = missed.iter().map(|row| row.site().to_string()).collect();
        return Err(
            format!("{} of {} sites missed: {}", missed.len(), table.sites.len(), sites.join(", ")).into()
        );
    }
    Ok(())
}
