import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

// Same release as android_demo/web/package.json (onnxruntime-web). The .ort files that
// `quantface package` writes come from the Python onnxruntime in requirements.txt; the ORT format is
// read by this and later releases (checked in the browser demo's test with onnxruntime-web).
val onnxruntimeVersion = "1.30.0"

android {
    namespace = "org.quantface.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.quantface.demo"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
    }

    // Two builds of the same app: `standard` with ONNX Runtime's stock Android package (CPU, NNAPI,
    // XNNPACK) and `qnn` with the package that also carries the Qualcomm QNN execution provider.
    // Both packages hold the same ai.onnxruntime classes, so they cannot share one APK.
    flavorDimensions += "runtime"
    productFlavors {
        create("standard") {
            dimension = "runtime"
        }
        create("qnn") {
            dimension = "runtime"
            applicationIdSuffix = ".qnn"
            versionNameSuffix = "-qnn"
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            proguardFiles(getDefaultProguardFile("proguard-android-optimize.txt"), "proguard-rules.pro")
        }
    }

    buildFeatures {
        buildConfig = true
    }

    androidResources {
        // The model is read whole into memory (QNN context models and binaries are copied to storage);
        // storing them uncompressed avoids inflating them first.
        noCompress += listOf("ort", "onnx", "bin")
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    compilerOptions {
        jvmTarget.set(JvmTarget.JVM_17)
    }
}

dependencies {
    implementation("androidx.core:core-ktx:1.13.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.3")
    implementation("androidx.lifecycle:lifecycle-viewmodel-ktx:2.8.7")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7")
    implementation("androidx.preference:preference-ktx:1.2.1")
    implementation("androidx.exifinterface:exifinterface:1.3.7")
    implementation("com.google.android.material:material:1.12.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")

    "standardImplementation"("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
    "qnnImplementation"("com.microsoft.onnxruntime:onnxruntime-android-qnn:$onnxruntimeVersion")
}

// The repository ships the app without a model (the generated assets are gitignored): say how to
// add one instead of building an app that can only show "no model".
val checkModelAsset by tasks.registering {
    val assets = layout.projectDirectory.dir("src/main/assets").asFile
    doLast {
        val manifest = File(assets, "model.json")
        if (!manifest.isFile) {
            logger.warn(
                "warning: no model in app/src/main/assets; the app will say so. Add one with\n" +
                    "  quantface package --onnx MODEL.onnx --out build/package --into-app"
            )
        }
        val limit = 20L * 1024 * 1024
        assets.listFiles()?.filter { it.isFile && it.length() > limit }?.forEach {
            logger.warn("warning: ${it.name} is ${it.length() / 1_000_000} MB; the repository keeps assets under 20 MB")
        }
    }
}

tasks.named("preBuild") {
    dependsOn(checkModelAsset)
}
